/* The pod sandbox ("pause") process of the e2e nodes: sleeps until told to
 * stop. No registry is reachable to pull the usual one; hack/images.sh builds
 * this statically into localhost/palisade/pause:e2e. */
#include <signal.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
  signal(SIGINT, stop);
  signal(SIGTERM, stop);
  for (;;) pause();
}
