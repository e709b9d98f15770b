//! Our retry of EC2 calls: exponential backoff with full jitter on
//! throttling and transient failures, a bounded number of attempts, and an
//! injectable sleep so tests do not wait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::CloudError;

/// Sleeps for a duration (tokio's sleep in production; instant in tests).
pub type Sleeper =
    Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync + 'static>;

/// How failed calls are retried.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
    /// How to wait.
    pub sleep: Sleeper,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("base", &self.base)
            .field("cap", &self.cap)
            .finish()
    }
}

impl Default for RetryPolicy {
    /// 8 attempts, 100 ms doubling up to 10 s, tokio's sleep.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            sleep: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        }
    }
}

impl RetryPolicy {
    /// The backoff before retry number `retry` (0-based): uniform in
    /// `[0, min(cap, base * 2^retry)]` (full jitter, so many callers
    /// throttled together do not retry together).
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(20)))
            .min(self.cap);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(fastrand::u64(0..=millis))
    }

    /// Runs `call` until it succeeds, fails with a non-retriable error, or
    /// `max_attempts` are spent; `observe` sees every attempt's outcome
    /// (`None` for success).
    pub async fn run<T, F, Fut>(
        &self,
        mut call: F,
        mut observe: impl FnMut(Option<&CloudError>),
    ) -> Result<T, CloudError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CloudError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call().await {
                Ok(v) => {
                    observe(None);
                    return Ok(v);
                }
                Err(e) => {
                    observe(Some(&e));
                    if !e.is_retriable() || attempt >= self.max_attempts.max(1) {
                        return Err(e);
                    }
                    (self.sleep)(self.backoff(attempt - 1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cloud::ErrorKind;
    use std::sync::Mutex;

    fn recording() -> (RetryPolicy, Arc<Mutex<Vec<Duration>>>) {
        let slept = Arc::new(Mutex::new(Vec::new()));
        let s = slept.clone();
        let policy = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
            sleep: Arc::new(move |d| {
                s.lock().unwrap().push(d);
                Box::pin(async {})
            }),
        };
        (policy, slept)
    }

    #[tokio::test]
    async fn throttling_is_retried_until_success() {
        let (policy, slept) = recording();
        let mut n = 0;
        let mut seen = 0;
        let out = policy
            .run(
                || {
                    n += 1;
                    let fail = n < 3;
                    async move {
                        if fail {
                            Err(CloudError::new("X", ErrorKind::Throttled, "slow down"))
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_| seen += 1,
            )
            .await
            .unwrap();
        assert_eq!(out, 3);
        assert_eq!(seen, 3);
        let slept = slept.lock().unwrap();
        assert_eq!(slept.len(), 2);
        assert!(slept[0] <= Duration::from_millis(100));
        assert!(slept[1] <= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried_and_attempts_are_bounded() {
        let (policy, slept) = recording();
        let mut n = 0;
        let err = policy
            .run(
                || {
                    n += 1;
                    async { Err::<(), _>(CloudError::new("X", ErrorKind::Auth, "no")) }
                },
                |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Auth);
        assert_eq!(n, 1);
        assert!(slept.lock().unwrap().is_empty());

        let mut n = 0;
        let err = policy
            .run(
                || {
                    n += 1;
                    async { Err::<(), _>(CloudError::new("X", ErrorKind::Transient, "503")) }
                },
                |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient);
        assert_eq!(n, 5);
        let slept = slept.lock().unwrap();
        assert_eq!(slept.len(), 4);
        assert!(slept.iter().all(|d| *d <= Duration::from_millis(1000)));
    }

    #[test]
    fn backoff_is_capped() {
        let policy = RetryPolicy::default();
        for retry in 0..40 {
            assert!(policy.backoff(retry) <= policy.cap);
        }
    }
}
