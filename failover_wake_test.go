package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestWakeAfterClusterFailover: the master of a lock's slot dies and its
// replica takes the slot over. A waiter whose sharded subscription was on
// the dead master follows the slot to the new master and is woken by the
// release published there, instead of sleeping until the holder's lease
// bound.
func TestWakeAfterClusterFailover(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 100*time.Second)
	name := redistest.UniqueName(t)
	owner, rep := cl.AddReplica(t, "{"+name+"}")
	oadm := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = oadm.Close() })
	radm := redis.NewClient(rep.Options())
	t.Cleanup(func() { _ = radm.Close() })

	hrdb := cl.Client(t)
	wrdb := cl.Client(t)
	hc, wc := redlatch.New(hrdb), redlatch.New(wrdb)
	t.Cleanup(func() { _ = hc.Close(); _ = wc.Close() })
	holder := hc.Mutex(name, redlatch.WithLease(20*time.Second))
	require.NoError(t, holder.Lock(ctx))
	waiter := wc.Mutex(name)
	got := make(chan time.Time, 1)
	go func() {
		err := waiter.Lock(ctx)
		if err == nil {
			got <- time.Now()
		}
	}()
	require.Eventually(t, func() bool {
		n, err := oadm.Do(ctx, "PUBSUB", "SHARDNUMSUB", "{"+name+"}:wake").Slice()
		return err == nil && len(n) == 2 && n[1] == int64(1)
	}, 5*time.Second, 10*time.Millisecond, "the waiter did not subscribe")
	require.NoError(t, oadm.Do(ctx, "WAIT", 1, 2000).Err())

	owner.Kill(t)
	awaitPromoted(t, ctx, radm, "{"+name+"}:lock", hrdb, wrdb)

	released := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	select {
	case at := <-got:
		t.Logf("woken %v after the release", at.Sub(released))
		require.Less(t, at.Sub(released), 2*time.Second, "waiter slept through the release")
	case <-time.After(40 * time.Second):
		t.Fatal("not woken")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// arrivals records when each waiter of a failover test got in, and the
// transient errors (the failover window) its retries went through.
type arrivals struct {
	mu   sync.Mutex
	at   map[string]time.Time
	errs map[string][]string
	wg   sync.WaitGroup
}

// start runs acquire until it succeeds or ctx ends, retrying the errors a
// blocked call returns while no master answers (documented: retry it).
func (a *arrivals) start(ctx context.Context, name string, acquire func(context.Context) error) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for ctx.Err() == nil {
			err := acquire(ctx)
			if err == nil {
				a.mu.Lock()
				a.at[name] = time.Now()
				a.mu.Unlock()
				return
			}
			if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				return
			}
			a.mu.Lock()
			a.errs[name] = append(a.errs[name], err.Error())
			a.mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
	}()
}

func (a *arrivals) get(name string) (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	at, ok := a.at[name]
	return at, ok
}

// waitFor waits up to d for the waiter name and returns when it got in.
func (a *arrivals) waitFor(t *testing.T, name string, d time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if at, ok := a.get(name); ok {
			return at
		}
		time.Sleep(5 * time.Millisecond)
	}
	a.mu.Lock()
	errs := a.errs[name]
	a.mu.Unlock()
	t.Fatalf("%s: not in within %v (errors meanwhile: %v)", name, d, errs)
	return time.Time{}
}

func (a *arrivals) requireWaiting(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, ok := a.get(n); ok {
			t.Fatalf("%s got in before it should", n)
		}
	}
}

// failoverTo runs SENTINEL FAILOVER and waits until the sentinel names the
// replica and until every rdb's commands reach it.
func failoverTo(t *testing.T, ctx context.Context, s *redistest.Sentinel, replica *redistest.Server, kill *redistest.Server, rdbs ...*redis.Client) time.Time {
	t.Helper()
	sc := redis.NewSentinelClient(&redis.Options{Addr: s.Addr})
	defer sc.Close()
	if kill != nil {
		kill.Kill(t) // the sentinel fails over after its down-after (1s)
	} else {
		require.NoError(t, sc.Failover(ctx, s.MasterName).Err())
	}
	start := time.Now()
	_, port, _ := net.SplitHostPort(replica.Addr)
	require.Eventually(t, func() bool {
		addr, err := sc.GetMasterAddrByName(ctx, s.MasterName).Result()
		if err != nil || net.JoinHostPort(addr[0], addr[1]) != replica.Addr {
			return false
		}
		for _, rdb := range rdbs {
			info, err := rdb.Info(ctx, "server").Result()
			if err != nil || !strings.Contains(info, "tcp_port:"+port+"\r") {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "the clients do not reach the promoted replica")
	t.Logf("failover: clients on the new master %v after SENTINEL FAILOVER or the kill", time.Since(start).Round(time.Millisecond))
	return start
}

// TestSentinelFailoverWaiters: holds and waiters of FairMutex, RWMutex
// (readers held with a writer queued; a writer held with readers waiting),
// Semaphore and CountDownLatch on two Clients of a sentinel failover client,
// across a SENTINEL FAILOVER.
//
//   - replicated: the promoted replica had everything. The holds survive
//     (Lost stays open), and each release after the failover wakes its
//     waiters at once, far below the lease and re-check bounds (the
//     watchdog timeout is 30s: a waiter woken by its re-check would take
//     10s).
//   - partitioned: the replication link was cut before anything was
//     taken. Every holder's Lost closes within about a watchdog period,
//     every waiter gets in within the documented bounds, and the fencing
//     tokens after the failover are higher than before.
func TestSentinelFailoverWaiters(t *testing.T) {
	t.Parallel() // see TestMain
	for _, tc := range []struct {
		name       string
		replicated bool
		kill       bool // the master dies instead of SENTINEL FAILOVER
		shared     bool // both Clients on one go-redis client
	}{{"replicated", true, false, false}, {"partitioned", false, false, false}, {"killed", true, true, false},
		{"shared", true, false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			master, replica, link := replicaPair(t)
			sentinel := redistest.NewSentinel(t, master)
			ctx := ctxT(t, 60*time.Second)
			waitSentinelReplica(t, ctx, sentinel, replica)

			timeout := 30 * time.Second
			if !tc.replicated {
				timeout = 3 * time.Second // renewals every second
			}
			r1, r2 := sentinel.FailoverClient(t), sentinel.FailoverClient(t)
			if tc.shared {
				r2 = r1
			}
			c1 := redlatch.New(r1, redlatch.WithWatchdogTimeout(timeout))
			c2 := redlatch.New(r2, redlatch.WithWatchdogTimeout(timeout))
			t.Cleanup(func() { _ = c1.Close(); _ = c2.Close() })
			if !tc.replicated {
				link.Partition()
			}

			failoverScenario(t, ctx, c1, c2, func(s string) string { return s }, tc.replicated, timeout,
				func() time.Time {
					if tc.replicated {
						require.NoError(t, master.Client(t).Do(ctx, "WAIT", 1, 2000).Err())
					}
					var kill *redistest.Server
					if tc.kill {
						kill = master
					}
					start := failoverTo(t, ctx, sentinel, replica, kill, r1, r2)
					link.Close() // the old master now replicates from the new one directly
					return start
				})
		})
	}
}

// failoverScenario takes holds and starts waiters of FairMutex, RWMutex
// (two readers held, a writer queued; a writer held, two readers waiting),
// Semaphore and CountDownLatch over Clients c1 and c2, runs failover (which
// returns when both Clients reach the new master), and checks what
// TestSentinelFailoverWaiters states. n maps a base name to the name used.
func failoverScenario(t *testing.T, ctx context.Context, c1, c2 *redlatch.Client, n func(string) string,
	replicated bool, timeout time.Duration, failover func() time.Time) {
	a := &arrivals{at: map[string]time.Time{}, errs: map[string][]string{}}
	wctx, wcancel := context.WithCancel(ctx)
	t.Cleanup(func() { wcancel(); a.wg.Wait() })

	// FairMutex: held on c1; queued: one waiter on c2, then one on c1.
	fh := c1.FairMutex(n("fo-fair"))
	require.NoError(t, fh.Lock(ctx))
	fairTok := fh.Token()
	fw1, fw2 := c2.FairMutex(n("fo-fair")), c1.FairMutex(n("fo-fair"))
	a.start(wctx, "fair-1", fw1.Lock)
	time.Sleep(100 * time.Millisecond)
	a.start(wctx, "fair-2", fw2.Lock)

	// RWMutex 1: two readers held (c1, c2), a writer queued on c2.
	rr1, rr2 := c1.RWMutex(n("fo-rw-r")), c2.RWMutex(n("fo-rw-r"))
	require.NoError(t, rr1.RLock(ctx))
	require.NoError(t, rr2.RLock(ctx))
	rwW := c2.RWMutex(n("fo-rw-r"))
	a.start(wctx, "rw-writer", rwW.Lock)

	// RWMutex 2: a writer held on c1, readers waiting on c1 and c2.
	wh := c1.RWMutex(n("fo-rw-w"))
	require.NoError(t, wh.Lock(ctx))
	rwTok := wh.Token()
	wr1, wr2 := c1.RWMutex(n("fo-rw-w")), c2.RWMutex(n("fo-rw-w"))
	a.start(wctx, "rw-reader-1", wr1.RLock)
	a.start(wctx, "rw-reader-2", wr2.RLock)

	// Semaphore of 2: both held on c1, waiters on c1 and c2.
	sh := c1.Semaphore(n("fo-sem"), 2)
	require.NoError(t, sh.Acquire(ctx, 2))
	sw1, sw2 := c1.Semaphore(n("fo-sem"), 2), c2.Semaphore(n("fo-sem"), 2)
	a.start(wctx, "sem-1", func(ctx context.Context) error { return sw1.Acquire(ctx, 1) })
	a.start(wctx, "sem-2", func(ctx context.Context) error { return sw2.Acquire(ctx, 1) })

	// CountDownLatch of 1: waiters on c1 and c2.
	lt := c1.CountDownLatch(n("fo-latch"))
	ok, err := lt.TrySetCount(ctx, 1)
	require.NoError(t, err)
	require.True(t, ok)
	lw1, lw2 := c1.CountDownLatch(n("fo-latch")), c2.CountDownLatch(n("fo-latch"))
	a.start(wctx, "latch-1", lw1.Wait)
	a.start(wctx, "latch-2", lw2.Wait)

	time.Sleep(300 * time.Millisecond) // every waiter queued and subscribed
	all := []string{"fair-1", "fair-2", "rw-writer", "rw-reader-1", "rw-reader-2", "sem-1", "sem-2", "latch-1", "latch-2"}
	a.requireWaiting(t, all...)

	shLost := sh.Lost()
	start := failover()
	if !replicated {
		// Released at once, before any renewal on the new master: the
		// holds are gone there, and the releases say so. (An Unlock that
		// finds its hold gone reports it and leaves Lost open, as on every
		// primitive.) The semaphore handle still holds one permit.
		require.ErrorIs(t, rr2.RUnlock(ctx), redlatch.ErrNotHeld, "RUnlock of a read hold the new master never had")
		require.ErrorIs(t, sh.Release(ctx, 1), redlatch.ErrNotHeld, "Release of permits the new master never had")
	}
	if replicated {
		time.Sleep(500 * time.Millisecond)
		for _, ch := range []<-chan struct{}{fh.Lost(), rr1.RLost(), rr2.RLost(), wh.Lost(), sh.Lost()} {
			requireOpen(t, ch, "a replicated hold was lost in the failover")
		}
		a.requireWaiting(t, all...)
		release := func(what string, waiters []string, rel func(context.Context) error) {
			t.Helper()
			at := time.Now()
			require.NoError(t, rel(ctx), what)
			for _, w := range waiters {
				got := a.waitFor(t, w, 12*time.Second)
				d := got.Sub(at)
				t.Logf("%s: woken %v after %s (%v after the failover)", w, d.Round(time.Millisecond), what, got.Sub(start).Round(time.Millisecond))
				require.Less(t, d, 1500*time.Millisecond, "%s slept through %s", w, what)
			}
		}
		release("fair Unlock", []string{"fair-1"}, fh.Unlock)
		require.Greater(t, fw1.Token(), fairTok)
		release("fair Unlock (2)", []string{"fair-2"}, fw1.Unlock)
		require.NoError(t, fw2.Unlock(ctx))
		release("RUnlock", nil, rr1.RUnlock)
		release("last RUnlock", []string{"rw-writer"}, rr2.RUnlock)
		require.Greater(t, rwW.Token(), int64(0))
		require.NoError(t, rwW.Unlock(ctx))
		release("write Unlock", []string{"rw-reader-1", "rw-reader-2"}, wh.Unlock)
		require.NoError(t, wr1.RUnlock(ctx))
		require.NoError(t, wr2.RUnlock(ctx))
		release("Release", []string{"sem-1", "sem-2"}, func(ctx context.Context) error { return sh.Release(ctx, 2) })
		require.NoError(t, sw1.Release(ctx, 1))
		require.NoError(t, sw2.Release(ctx, 1))
		release("CountDown", []string{"latch-1", "latch-2"}, lt.CountDown)
		return
	}

	// Partitioned: the new master has none of it.
	for _, l := range []struct {
		name string
		ch   <-chan struct{}
	}{{"fair holder", fh.Lost()}, {"reader 1", rr1.RLost()},
		{"writer", wh.Lost()}, {"semaphore holder", shLost}} {
		select {
		case <-l.ch:
		default:
			requireClosedWithin(t, l.ch, timeout+time.Second-time.Since(start), l.name+" Lost")
		}
		t.Logf("%s: Lost closed by %v after the failover", l.name, time.Since(start).Round(time.Millisecond))
	}
	for _, w := range all[2:] {
		got := a.waitFor(t, w, start.Add(2*timeout).Sub(time.Now()))
		t.Logf("%s: in %v after the failover (errors: %d)", w, got.Sub(start).Round(time.Millisecond), len(a.errs[w]))
	}
	// The fair waiters get in one after the other, either way round
	// now that the queue was lost.
	deadline := start.Add(2 * timeout)
	var first *redlatch.FairMutex
	for first == nil && time.Now().Before(deadline) {
		if _, ok := a.get("fair-1"); ok {
			first = fw1
		} else if _, ok := a.get("fair-2"); ok {
			first = fw2
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.NotNil(t, first, "no fair waiter got in within %v", 2*timeout)
	t.Logf("first fair waiter in %v after the failover", time.Since(start).Round(time.Millisecond))
	require.Greater(t, first.Token(), fairTok, "fair token after the failover")
	require.NoError(t, first.Unlock(ctx))
	for _, w := range all[:2] {
		got := a.waitFor(t, w, 5*time.Second)
		t.Logf("%s: in %v after the failover", w, got.Sub(start).Round(time.Millisecond))
	}
	require.Greater(t, rwW.Token(), rwTok, "write token after the failover")
	require.ErrorIs(t, fh.Unlock(ctx), redlatch.ErrNotHeld)
	require.ErrorIs(t, wh.Unlock(ctx), redlatch.ErrNotHeld)
	require.ErrorIs(t, sh.Release(ctx, 1), redlatch.ErrNotHeld)
}

// TestClusterFailoverWaiters is TestSentinelFailoverWaiters on a Redis
// Cluster whose master of every name's slot dies and whose replica takes
// the slots over: replicated (WAIT before the kill), or partitioned (the
// replica's link was refused from before anything was taken: the master's
// default user may not PSYNC).
func TestClusterFailoverWaiters(t *testing.T) {
	t.Parallel() // see TestMain
	for _, tc := range []struct {
		name       string
		replicated bool
		manual     bool // CLUSTER FAILOVER on the replica: the old master lives on as its replica
	}{{"replicated", true, false}, {"partitioned", false, false}, {"manual", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			cl := redistest.NewCluster(t, 3)
			ctx := ctxT(t, 90*time.Second)
			base := redistest.UniqueName(t)
			first := cl.ServerFor("{" + base + "}")
			n := func(s string) string { // a name on the same master as base
				for i := 0; ; i++ {
					name := fmt.Sprintf("%s-%s-%d", base, s, i)
					if cl.ServerFor("{"+name+"}") == first {
						return name
					}
				}
			}
			owner, rep := cl.AddReplica(t, "{"+base+"}")
			oadm := redis.NewClient(owner.Options())
			t.Cleanup(func() { _ = oadm.Close() })
			ropts := rep.Options()
			ropts.OnConnect = func(ctx context.Context, cn *redis.Conn) error {
				return cn.ReadOnly(ctx).Err() // reads on the replica
			}
			radm := redis.NewClient(ropts)
			t.Cleanup(func() { _ = radm.Close() })
			if !tc.replicated {
				require.NoError(t, oadm.Do(ctx, "ACL", "SETUSER", "default", "-psync", "-sync").Err())
				require.NoError(t, oadm.Do(ctx, "CLIENT", "KILL", "TYPE", "replica").Err())
				require.Eventually(t, func() bool {
					s, _ := radm.Info(ctx, "replication").Result()
					return strings.Contains(s, "master_link_status:down")
				}, 5*time.Second, 20*time.Millisecond)
			}
			timeout := 30 * time.Second
			if !tc.replicated {
				timeout = 9 * time.Second // holds outlive the failover's few seconds
			}
			r1, r2 := cl.Client(t), cl.Client(t)
			c1 := redlatch.New(r1, redlatch.WithWatchdogTimeout(timeout))
			c2 := redlatch.New(r2, redlatch.WithWatchdogTimeout(timeout))
			t.Cleanup(func() { _ = c1.Close(); _ = c2.Close() })
			failoverScenario(t, ctx, c1, c2, n, tc.replicated, timeout, func() time.Time {
				key := "{" + n("fo-fair") + "}:fair"
				if tc.replicated {
					require.NoError(t, oadm.Do(ctx, "WAIT", 1, 2000).Err())
					n, err := radm.Exists(ctx, key).Result()
					require.NoError(t, err)
					require.EqualValues(t, 1, n, "the replica lacks the hold")
				} else {
					n, err := radm.Exists(ctx, key).Result()
					require.NoError(t, err)
					require.EqualValues(t, 0, n, "the replica has the hold")
				}
				killed := time.Now()
				if tc.manual {
					require.NoError(t, radm.Do(ctx, "CLUSTER", "FAILOVER").Err())
				} else {
					owner.Kill(t)
				}
				awaitPromoted(t, ctx, radm, key, r1, r2)
				t.Logf("failover: clients on the new master %v after the kill", time.Since(killed).Round(time.Millisecond))
				return time.Now()
			})
		})
	}
}

// awaitPromoted waits until the replica radm talks to is a master, then
// until each cluster client reaches the new master of key's slot (its slot
// map reloaded).
func awaitPromoted(t *testing.T, ctx context.Context, radm *redis.Client, key string, clients ...*redis.ClusterClient) {
	t.Helper()
	require.Eventually(t, func() bool {
		s, _ := radm.Info(ctx, "replication").Result()
		return strings.Contains(s, "role:master")
	}, 30*time.Second, 50*time.Millisecond, "the replica was not promoted")
	require.Eventually(t, func() bool {
		for _, c := range clients {
			c.ReloadState(ctx)
			if c.Exists(ctx, key).Err() != nil {
				return false
			}
		}
		return true
	}, 20*time.Second, 50*time.Millisecond, "the clients do not reach the new master")
}

// TestFailoverPartialLossFairAndSemaphore: a sentinel failover to a replica
// that has only the first part of a FairMutex queue and of a Semaphore's
// permits (the link was cut after them). The semaphore holder whose permit
// was lost is told (Lost closes), the one that was replicated keeps its
// permit, and the semaphore never admits more than its size once the loss
// is known. The fair waiter whose place was lost is not stranded: it gets
// the lock after the replicated waiter, within a watchdog timeout.
func TestFailoverPartialLossFairAndSemaphore(t *testing.T) {
	master, replica, link := replicaPair(t)
	sentinel := redistest.NewSentinel(t, master)
	ctx := ctxT(t, 60*time.Second)
	waitSentinelReplica(t, ctx, sentinel, replica)
	timeout := 9 * time.Second
	r1, r2 := sentinel.FailoverClient(t), sentinel.FailoverClient(t)
	c1 := newClientOn(t, r1, redlatch.WithWatchdogTimeout(timeout))
	c2 := newClientOn(t, r2, redlatch.WithWatchdogTimeout(timeout))
	name := redistest.UniqueName(t)
	mc := master.Client(t)

	semA := c1.Semaphore(name, 2)
	require.NoError(t, semA.Acquire(ctx, 1))
	fh := c1.FairMutex(name)
	require.NoError(t, fh.Lock(ctx))
	var w1In, w2In atomic.Int64
	fw1, fw2 := c2.FairMutex(name), c1.FairMutex(name)
	go func() {
		if fw1.Lock(ctx) == nil {
			w1In.Store(time.Now().UnixNano())
		}
	}()
	waitQueued(t, mc, name, 1)
	require.NoError(t, mc.Do(ctx, "WAIT", 1, 2000).Err())

	link.Partition()
	semB := c2.Semaphore(name, 2)
	require.NoError(t, semB.Acquire(ctx, 1))
	go func() {
		if fw2.Lock(ctx) == nil {
			w2In.Store(time.Now().UnixNano())
		}
	}()
	waitQueued(t, mc, name, 2)

	start := failoverTo(t, ctx, sentinel, replica, master, r1, r2)
	link.Close()

	requireClosedWithin(t, semB.Lost(), timeout+time.Second-time.Since(start), "Lost of the permit the failover lost")
	requireOpen(t, semA.Lost(), "a replicated permit was lost")
	requireOpen(t, fh.Lost(), "a replicated fair hold was lost")
	semC := c1.Semaphore(name, 2)
	ok, err := semC.TryAcquire(ctx, 1)
	require.NoError(t, err)
	require.True(t, ok, "the lost permit is free again")
	ok, err = c2.Semaphore(name, 2).TryAcquire(ctx, 1)
	require.NoError(t, err)
	require.False(t, ok, "more holders than the size")
	require.ErrorIs(t, semB.Release(ctx, 1), redlatch.ErrNotHeld)

	released := time.Now()
	require.NoError(t, fh.Unlock(ctx))
	require.Eventually(t, func() bool { return w1In.Load() != 0 }, 2*time.Second, 5*time.Millisecond,
		"the replicated fair waiter slept through the release")
	require.Zero(t, w2In.Load(), "the lost waiter went first")
	t.Logf("first fair waiter in %v after the release", time.Unix(0, w1In.Load()).Sub(released))
	released = time.Now()
	require.NoError(t, fw1.Unlock(ctx))
	require.Eventually(t, func() bool { return w2In.Load() != 0 }, timeout, 5*time.Millisecond,
		"the fair waiter whose place was lost is stranded")
	t.Logf("second fair waiter in %v after the release", time.Unix(0, w2In.Load()).Sub(released))
	require.NoError(t, fw2.Unlock(ctx))
	require.NoError(t, semA.Release(ctx, 1))
	require.NoError(t, semC.Release(ctx, 1))
}
