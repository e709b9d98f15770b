//! The EC2 side of the controller, behind one small trait ([`Ec2`]).
//!
//! - [`Ec2`]: exactly the calls the controller makes — find/describe/create/
//!   delete Security Groups, read their rules (paginated), authorize and
//!   revoke (one call per group and direction), re-describe rules in place,
//!   read instances and ENIs, set an ENI's groups, and resolve Security Group
//!   and prefix-list references to addresses. Every value crossing the trait
//!   is a `policy` type or a plain struct of this module: no SDK type leaks.
//! - [`AwsEc2`]: the implementation over `aws-sdk-ec2`, with the SDK's own
//!   retries off and [`RetryPolicy`] in their place (exponential backoff with
//!   full jitter on throttling and 5xx, bounded attempts).
//! - [`CloudError`]: every failure, classified ([`ErrorKind`]) so the
//!   controller knows what to retry and what to report as `Stalled`.

mod aws;
mod retry;

use std::collections::BTreeMap;
use std::future::Future;

use ipnet::IpNet;

use crate::policy::{CurrentSgRule, Direction, PlannedPermission, PrefixListFacts};

pub use aws::{AwsEc2, CallObserver};
pub use retry::{RetryPolicy, Sleeper};

/// Most values EC2 accepts in one filter (and ids in one Describe call):
/// every Describe of many ids is split into calls of at most this many.
pub const MAX_FILTER_VALUES: usize = 200;

/// Tag keys Palisade writes on the groups it creates.
pub mod tags {
    /// The cluster a group belongs to (`--cluster-name`).
    pub const CLUSTER: &str = "palisade.dev/cluster";
    /// The policy a group (or rule) was created for.
    pub const POLICY: &str = "palisade.dev/policy";
    /// The uid of that policy.
    pub const POLICY_UID: &str = "palisade.dev/policy-uid";
    /// On a group shared by the policies of one class (same node selector):
    /// the class's key.
    pub const SHARED: &str = "palisade.dev/shared-selector";
    /// On a group composed for the nodes selected by several selectors
    /// (see `controller::compose`): one tag per selector whose policies the
    /// group holds, this prefix followed by the selector's key (value `1`).
    pub const SELECTOR_PREFIX: &str = "palisade.dev/selector.";
    /// Always `palisade`.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Value of [`MANAGED_BY`].
    pub const MANAGER: &str = "palisade";

    /// The tag Palisade puts on a network interface when it attaches an
    /// *adopted* group there for a policy (value: the policy's name), so
    /// it later detaches that group only where it attached it, across
    /// restarts, without keeping a list per policy. Groups Palisade created
    /// need none: every interface carrying one is Palisade's to manage.
    pub fn attached(group_id: &str, policy_uid: &str) -> String {
        format!("palisade.dev/attached/{group_id}/{policy_uid}")
    }
}

/// How a failed EC2 call is to be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// `RequestLimitExceeded` and other throttling codes: retry later.
    Throttled,
    /// 5xx, timeouts, connection failures: retry later.
    Transient,
    /// A named resource does not exist (`what` is AWS's code, e.g.
    /// `InvalidGroup.NotFound`).
    NotFound {
        /// AWS's error code.
        what: String,
    },
    /// The rule or group already exists.
    Duplicate,
    /// A quota (rules per group, groups per ENI, groups per VPC) is reached.
    QuotaExceeded,
    /// The group is still in use (attached, or referenced by another group).
    DependencyViolation,
    /// Credentials or permissions refused.
    Auth,
    /// Anything else AWS refused: a bad request that retrying cannot fix.
    Invalid,
}

impl ErrorKind {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ErrorKind::Throttled => "throttled",
            ErrorKind::Transient => "transient",
            ErrorKind::NotFound { .. } => "not_found",
            ErrorKind::Duplicate => "duplicate",
            ErrorKind::QuotaExceeded => "quota_exceeded",
            ErrorKind::DependencyViolation => "dependency_violation",
            ErrorKind::Auth => "auth",
            ErrorKind::Invalid => "invalid",
        }
    }
}

/// One failed EC2 call, after retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("EC2 {operation} failed ({}): {message}", kind.label())]
pub struct CloudError {
    /// The EC2 action (`AuthorizeSecurityGroupIngress`, ...).
    pub operation: &'static str,
    /// The classification.
    pub kind: ErrorKind,
    /// AWS's code and message, or the transport error.
    pub message: String,
}

impl CloudError {
    /// Whether trying the same call again later may succeed.
    pub fn is_retriable(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }

    pub(crate) fn new(
        operation: &'static str,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> Self {
        CloudError {
            operation,
            kind,
            message: message.into(),
        }
    }
}

/// Classifies an AWS error code (and the HTTP status, when known).
pub fn classify(code: Option<&str>, status: Option<u16>) -> ErrorKind {
    match code.unwrap_or_default() {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "TooManyRequestsException"
        | "SlowDown" => ErrorKind::Throttled,
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            ErrorKind::Transient
        }
        "InvalidPermission.Duplicate" | "InvalidGroup.Duplicate" => ErrorKind::Duplicate,
        "DependencyViolation" | "InvalidGroup.InUse" => ErrorKind::DependencyViolation,
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "OptInRequired"
        | "Blocked" => ErrorKind::Auth,
        c if c.ends_with(".NotFound") || c.ends_with(".Malformed") => ErrorKind::NotFound {
            what: c.to_string(),
        },
        c if c.ends_with("LimitExceeded") => ErrorKind::QuotaExceeded,
        "" => match status {
            Some(s) if s >= 500 => ErrorKind::Transient,
            Some(429) => ErrorKind::Throttled,
            None => ErrorKind::Transient,
            Some(_) => ErrorKind::Invalid,
        },
        _ if status.is_some_and(|s| s >= 500) => ErrorKind::Transient,
        _ => ErrorKind::Invalid,
    }
}

/// A Security Group as described.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupInfo {
    /// `sg-...`.
    pub id: String,
    /// `GroupName`.
    pub name: String,
    /// The VPC it lives in.
    pub vpc_id: Option<String>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// What the controller needs to know about an instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceInfo {
    /// `i-...`.
    pub id: String,
    /// Its VPC.
    pub vpc_id: Option<String>,
    /// The ENI at device index 0.
    pub primary_eni: Option<String>,
    /// Private IPv4 addresses of the primary ENI.
    pub private_ips: Vec<String>,
    /// The groups of the primary ENI.
    pub eni_groups: Vec<String>,
}

/// A network interface carrying a group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EniInfo {
    /// `eni-...`.
    pub id: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// The instance it is attached to, if any.
    pub instance_id: Option<String>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// A new group to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewGroup {
    /// `GroupName` (unique per VPC).
    pub name: String,
    /// `Description`.
    pub description: String,
    /// The VPC.
    pub vpc_id: String,
    /// Tags written with the group (one call, no untagged window).
    pub tags: BTreeMap<String, String>,
}

/// The EC2 calls the controller makes. Implementations retry throttling
/// and transient failures themselves; an error returned is final for this
/// reconcile.
pub trait Ec2: Send + Sync + 'static {
    /// Groups carrying every one of `tags` (tag filters, one paginated call).
    fn find_groups(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<GroupInfo>, CloudError>> + Send;

    /// Groups carrying every one of `tags` and tag `key` with one of
    /// `values` (tag filters; one paginated call per
    /// [`MAX_FILTER_VALUES`] values). No values, no call.
    fn find_groups_any(
        &self,
        tags: &BTreeMap<String, String>,
        key: &str,
        values: &[String],
    ) -> impl Future<Output = Result<Vec<GroupInfo>, CloudError>> + Send;

    /// Describes the groups by id; a missing id is `NotFound`.
    fn describe_groups(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<GroupInfo>, CloudError>> + Send;

    /// Every rule of a group, both directions (DescribeSecurityGroupRules,
    /// following NextToken to the end).
    fn describe_rules(
        &self,
        group_id: &str,
    ) -> impl Future<Output = Result<Vec<CurrentSgRule>, CloudError>> + Send;

    /// Authorizes `permissions` in one call, tagging the new rules with the
    /// policy name. Returns the new rule ids.
    fn authorize(
        &self,
        group_id: &str,
        direction: Direction,
        permissions: &[PlannedPermission],
        policy: &str,
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;

    /// Revokes rules by id in one call.
    fn revoke(
        &self,
        group_id: &str,
        direction: Direction,
        rule_ids: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Rewrites rule descriptions in place (ModifySecurityGroupRules, one
    /// call per group). Each entry is the rule as it is and its new
    /// description.
    fn update_descriptions(
        &self,
        group_id: &str,
        rules: &[(CurrentSgRule, String)],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Creates a group with its tags; returns its id.
    fn create_group(
        &self,
        group: &NewGroup,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;

    /// Deletes a group.
    fn delete_group(&self, group_id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Describes instances by id (unknown ids are left out).
    fn describe_instances(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<InstanceInfo>, CloudError>> + Send;

    /// The groups of an ENI.
    fn eni_groups(&self, eni: &str)
    -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;

    /// Replaces the groups of an ENI.
    fn set_eni_groups(
        &self,
        eni: &str,
        groups: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// The ENIs whose groups include `group_id` (one paginated call).
    fn enis_in_group(
        &self,
        group_id: &str,
    ) -> impl Future<Output = Result<Vec<EniInfo>, CloudError>> + Send;

    /// The ENIs whose groups include any of `group_ids`, each once (one
    /// paginated call per [`MAX_FILTER_VALUES`] ids). No ids, no call.
    fn enis_in_groups(
        &self,
        group_ids: &[String],
    ) -> impl Future<Output = Result<Vec<EniInfo>, CloudError>> + Send;

    /// The groups of each of `enis`, by ENI (one paginated call per
    /// [`MAX_FILTER_VALUES`] ids); an ENI that does not exist is left out.
    /// No ids, no call.
    fn groups_of_enis(
        &self,
        enis: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, Vec<String>>, CloudError>> + Send;

    /// Sets tag `key` on an ENI.
    fn tag_eni(
        &self,
        eni: &str,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Removes tag `key` from an ENI.
    fn untag_eni(
        &self,
        eni: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;

    /// Private addresses (v4 and v6, as host networks) of the interfaces in
    /// each of `group_ids`.
    fn group_members(
        &self,
        group_ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, Vec<IpNet>>, CloudError>> + Send;

    /// Entries and sizes of managed prefix lists.
    fn prefix_lists(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, PrefixListFacts>, CloudError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(
            classify(Some("RequestLimitExceeded"), Some(503)),
            ErrorKind::Throttled
        );
        assert_eq!(classify(None, Some(503)), ErrorKind::Transient);
        assert_eq!(
            classify(Some("InternalError"), Some(500)),
            ErrorKind::Transient
        );
        assert_eq!(
            classify(Some("InvalidGroup.NotFound"), Some(400)),
            ErrorKind::NotFound {
                what: "InvalidGroup.NotFound".into()
            }
        );
        assert_eq!(
            classify(Some("InvalidPermission.Duplicate"), Some(400)),
            ErrorKind::Duplicate
        );
        assert_eq!(
            classify(Some("RulesPerSecurityGroupLimitExceeded"), Some(400)),
            ErrorKind::QuotaExceeded
        );
        assert_eq!(
            classify(Some("DependencyViolation"), Some(400)),
            ErrorKind::DependencyViolation
        );
        assert_eq!(classify(Some("AuthFailure"), Some(401)), ErrorKind::Auth);
        assert_eq!(
            classify(Some("InvalidParameterValue"), Some(400)),
            ErrorKind::Invalid
        );
        assert!(CloudError::new("X", ErrorKind::Throttled, "").is_retriable());
        assert!(!CloudError::new("X", ErrorKind::Auth, "").is_retriable());
    }
}
