// Package chaos is redlatch's fault-injection suite: real redis-server
// processes, toxiproxy embedded as a library, worker processes paused with
// SIGSTOP, and checkers for mutual exclusion, lost updates, fencing,
// liveness and leftovers. The checkers and harness live in this package; the
// scenarios are its tests. See README.md.
package chaos
