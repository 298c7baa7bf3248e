package redlatch_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestSentinelFailoverLock: a lock held through a sentinel failover client
// across a SENTINEL FAILOVER (one master, one replica, one sentinel on
// loopback).
//
//   - replicated: the lock was taken WithReplicaSync, so the promoted
//     replica has it (with two replicas, the sentinel promotes the most
//     up to date). It survives the failover: the watchdog renews it on the
//     new master, Lost stays open, another client cannot take it, and Unlock
//     succeeds.
//   - partitioned: the lock was taken, without replica sync, while the
//     replication link was cut, so the promoted replica never had it. It
//     fails loudly: the first renewal on the new master finds it gone, Lost
//     closes, Unlock returns ErrNotHeld, and another client can take it.
func TestSentinelFailoverLock(t *testing.T) {
	t.Parallel() // see TestMain
	for _, tc := range []struct {
		name       string
		replicated bool
	}{{"replicated", true}, {"partitioned", false}} {
		t.Run(tc.name, func(t *testing.T) {
			master, replica, link := replicaPair(t)
			replicas := []*redistest.Server{replica}
			if tc.replicated {
				// A second replica, which the sentinel points at the new
				// master at once, so that the new master has a replica to
				// acknowledge renewals (the demoted master is converted to a
				// replica only seconds later).
				host, port, _ := net.SplitHostPort(master.Addr)
				second := redistest.NewServer(t, "--replicaof", host, port, "--repl-diskless-sync-delay", "0")
				waitInSync(t, master, second)
				replicas = append(replicas, second)
			}
			sentinel := redistest.NewSentinel(t, master)
			ctx := ctxT(t, 60*time.Second)
			for _, r := range replicas {
				waitSentinelReplica(t, ctx, sentinel, r)
			}

			timeout := 6 * time.Second // renewals every 2s
			opts := []redlatch.Option{redlatch.WithWatchdogTimeout(timeout)}
			if tc.replicated {
				opts = append(opts, redlatch.WithReplicaSync(1, time.Second))
			}
			c1 := newClientOn(t, sentinel.FailoverClient(t), opts...)
			c2 := newClientOn(t, sentinel.FailoverClient(t))

			if !tc.replicated {
				link.Partition()
			}
			m := c1.Mutex("sentinel-failover")
			require.NoError(t, m.Lock(ctx))

			sc := redis.NewSentinelClient(&redis.Options{Addr: sentinel.Addr})
			t.Cleanup(func() { _ = sc.Close() })
			require.NoError(t, sc.Failover(ctx, sentinel.MasterName).Err())
			require.Eventually(t, func() bool {
				addr, err := sc.GetMasterAddrByName(ctx, sentinel.MasterName).Result()
				if err != nil {
					return false
				}
				for _, r := range replicas {
					if net.JoinHostPort(addr[0], addr[1]) == r.Addr {
						return true
					}
				}
				return false
			}, 30*time.Second, 50*time.Millisecond, "sentinel did not promote the replica")
			link.Close() // the old master now replicates from the new one directly

			other := c2.Mutex("sentinel-failover")
			if tc.replicated {
				// Two renewal periods on the new master.
				time.Sleep(2*timeout/3 + timeout/3)
				requireOpen(t, m.Lost(), "replicated lock lost in the failover")
				ok, err := tryLockRetrying(ctx, other)
				require.NoError(t, err)
				require.False(t, ok, "another client took a lock that survived the failover")
				require.NoError(t, m.Unlock(ctx))
				require.NoError(t, other.Lock(ctx))
			} else {
				requireClosedWithin(t, m.Lost(), 2*timeout, "Lost of a lock the promoted replica never had")
				require.ErrorIs(t, m.Unlock(ctx), redlatch.ErrNotHeld)
				ok, err := tryLockRetrying(ctx, other)
				require.NoError(t, err)
				require.True(t, ok)
			}
			require.NoError(t, other.Unlock(ctx))
		})
	}
}

// tryLockRetrying is TryLock, retried while the failover client still
// reaches the demoted master (READONLY) or reconnects.
func tryLockRetrying(ctx context.Context, m *redlatch.Mutex) (ok bool, err error) {
	for i := 0; i < 50; i++ {
		if ok, err = m.TryLock(ctx); err == nil {
			return ok, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return ok, err
}

// waitSentinelReplica waits until the sentinel knows the replica and sees
// its link to the master up, so that SENTINEL FAILOVER can promote it.
func waitSentinelReplica(t *testing.T, ctx context.Context, s *redistest.Sentinel, replica *redistest.Server) {
	t.Helper()
	sc := redis.NewSentinelClient(&redis.Options{Addr: s.Addr})
	defer sc.Close()
	require.Eventually(t, func() bool {
		reps, err := sc.Replicas(ctx, s.MasterName).Result()
		if err != nil {
			return false
		}
		for _, r := range reps {
			if net.JoinHostPort(r["ip"], r["port"]) == replica.Addr &&
				r["flags"] == "slave" && r["master-link-status"] == "ok" {
				return true
			}
		}
		return false
	}, 30*time.Second, 100*time.Millisecond, "sentinel does not see the replica")
}

// sentinelOfPair starts a master with a replica and a sentinel monitoring
// them, and returns once the sentinel knows the replica.
func sentinelOfPair(t *testing.T) (context.Context, *redistest.Sentinel, *redistest.Server, *redistest.Server) {
	t.Helper()
	master, replica, _ := replicaPair(t)
	sentinel := redistest.NewSentinel(t, master)
	ctx := ctxT(t, 60*time.Second)
	waitSentinelReplica(t, ctx, sentinel, replica)
	return ctx, sentinel, master, replica
}

// staleMasterClient returns a sentinel failover client of master (2s read
// and write timeouts, ContextTimeoutEnabled; tune changes more) whose dials
// to the master go to replica instead while the returned count, decremented
// by each, is above 0: a view of the master that a failover made stale.
func staleMasterClient(t *testing.T, sentinel *redistest.Sentinel, master, replica *redistest.Server,
	tune func(*redis.FailoverOptions)) (*redis.Client, *atomic.Int32) {
	t.Helper()
	stale := new(atomic.Int32)
	var d net.Dialer
	o := &redis.FailoverOptions{
		MasterName: sentinel.MasterName, SentinelAddrs: []string{sentinel.Addr},
		ContextTimeoutEnabled: true, DialTimeout: time.Second,
		ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
		Dialer: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr == master.Addr && stale.Load() > 0 && stale.Add(-1) >= 0 {
				addr = replica.Addr
			}
			return d.DialContext(ctx, network, addr)
		},
	}
	if tune != nil {
		tune(o)
	}
	rdb := redis.NewFailoverClient(o)
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb, stale
}

// TestReplicaSyncReadOnlyRidesOut: a sentinel failover client whose view
// still names a node that is a replica now (a demoted master, a sentinel
// that has not caught up) gets READONLY for its first script call. go-redis
// drops that connection and sends the call again on a new one, whose dial
// resolves the master: a plain Lock, and one under WithReplicaSync whose
// script and WAIT go pipelined, ride it out. So must one whose WAIT does
// not fit within the read timeout (2s here), sent on a pinned connection,
// which go-redis cannot send again: it returned "redis: Conn is in a bad
// state: READONLY ..." at once.
func TestReplicaSyncReadOnlyRidesOut(t *testing.T) {
	ctx, sentinel, master, replica := sentinelOfPair(t)

	for _, tc := range []struct {
		name string
		opts []redlatch.Option
	}{
		{"plain", nil},
		{"pipelined", []redlatch.Option{redlatch.WithReplicaSync(1, time.Second)}},
		{"pinned", []redlatch.Option{redlatch.WithReplicaSync(1, 2*time.Second)}},
	} {
		for _, op := range []struct {
			name    string
			acquire func(ctx context.Context, c *redlatch.Client, name string) error
		}{
			{"Mutex.Lock", func(ctx context.Context, c *redlatch.Client, name string) error {
				m := c.Mutex(name)
				if err := m.Lock(ctx); err != nil {
					return err
				}
				return m.Unlock(ctx)
			}},
			{"Semaphore.Acquire", func(ctx context.Context, c *redlatch.Client, name string) error {
				s := c.Semaphore(name, 2)
				if err := s.Acquire(ctx, 1); err != nil {
					return err
				}
				return s.Release(ctx, 1)
			}},
		} {
			t.Run(tc.name+"/"+op.name, func(t *testing.T) {
				// The first dial to the master goes to the replica instead.
				rdb, stale := staleMasterClient(t, sentinel, master, replica, nil)
				stale.Store(1)
				c := newClientOn(t, rdb, tc.opts...)

				actx, cancel := context.WithTimeout(ctx, 10*time.Second)
				defer cancel()
				require.NoError(t, op.acquire(actx, c, redistest.UniqueName(t)))
				require.LessOrEqual(t, stale.Load(), int32(0), "the READONLY replica was not reached")
			})
		}
	}
}

// TestReplicaSyncRenewalReadOnlyRidesOut: the watchdog's renewal of a hold
// taken WithReplicaSync, through a sentinel failover client whose next
// dials still reach a node that is a replica now (READONLY), as after a
// failover. A renewal whose scripts and WAIT go pipelined is sent again by
// go-redis on a new connection; one on a pinned connection (the WAIT does not
// fit within the 2s read timeout) must be sent again too, as the
// acquisition's is (see TestReplicaSyncReadOnlyRidesOut): else each period's
// renewal fails, and the hold is lost when its lease runs out, with the
// master renewing it at the first try on a connection of its own. A
// Semaphore's permit (renewed by a ZADD that renew.lua runs with pcall, so
// that a write refused at maxmemory does not end the batch) must fail with
// READONLY on the replica too, not as "refused" (-1), which neither go-redis
// nor redlatch sends again: it was lost on both paths. (Found by a
// reviewer.)
func TestReplicaSyncRenewalReadOnlyRidesOut(t *testing.T) {
	t.Parallel() // see TestMain
	ctx, sentinel, master, replica := sentinelOfPair(t)

	for _, tc := range []struct {
		name    string
		timeout time.Duration
	}{{"pipelined", time.Second}, {"pinned", 2 * time.Second}} {
		for _, op := range []struct {
			name string
			hold func(ctx context.Context, c *redlatch.Client, name string) (lost <-chan struct{}, release func(context.Context) error, err error)
		}{
			{"Mutex", func(ctx context.Context, c *redlatch.Client, name string) (<-chan struct{}, func(context.Context) error, error) {
				m := c.Mutex(name)
				return m.Lost(), m.Unlock, m.Lock(ctx)
			}},
			{"Semaphore", func(ctx context.Context, c *redlatch.Client, name string) (<-chan struct{}, func(context.Context) error, error) {
				s := c.Semaphore(name, 2)
				err := s.Acquire(ctx, 1)
				return s.Lost(), func(ctx context.Context) error { return s.Release(ctx, 1) }, err
			}},
		} {
			t.Run(tc.name+"/"+op.name, func(t *testing.T) {
				rdb, stale := staleMasterClient(t, sentinel, master, replica, func(o *redis.FailoverOptions) {
					o.ConnMaxIdleTime = 300 * time.Millisecond // each renewal (every second) dials anew
				})
				c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(3*time.Second),
					redlatch.WithReplicaSync(1, tc.timeout))

				lost, release, err := op.hold(ctx, c, redistest.UniqueName(t))
				require.NoError(t, err)
				// The next three dials (go-redis's MaxRetries) reach the
				// replica: renewals not sent again fail for three periods.
				stale.Store(3)
				time.Sleep(4500 * time.Millisecond) // four renewal periods, past the first lease
				requireOpen(t, lost, "hold lost: its renewals refused with READONLY were not sent again")
				require.LessOrEqual(t, stale.Load(), int32(0), "the READONLY replica was not reached")
				require.NoError(t, release(ctx))
			})
		}
	}
}
