package redlatch_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"regexp"
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

// TestWakeAfterSlotMovedStaleMap: a lock's slot moved to another
// master before a waiter of a Client whose slot map predates the move
// subscribes. Its attempt is redirected (MOVED) by go-redis, which only
// starts a reload of the slot map in the background; the join that follows
// asks MasterForKey at once, gets the old master, and SSUBSCRIBEs there. The
// old master answers -MOVED, which makes the subscription follow the slot to
// its new master, as after a migration (it was ignored as a refused command:
// the channel stayed on the wrong master, every release SPUBLISHed on the
// new one was lost, and the waiter slept until the holder's lease bound).
// (Found by a reviewer.)
func TestWakeAfterSlotMovedStaleMap(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	name := redistest.UniqueName(t)
	owner := cl.ServerFor("{" + name + "}")
	to := 0
	for i, s := range cl.Servers {
		if s != owner {
			to = i
		}
	}
	// The waiter's slot map reloads take 200ms (a loaded or remote node):
	// without this the test still fails about every other run, the
	// background reload racing the join.
	admin := redis.NewClient(cl.Servers[0].Options())
	t.Cleanup(func() { _ = admin.Close() })
	var slow atomic.Bool
	opt := cl.Options()
	opt.ClusterSlots = func(ctx context.Context) ([]redis.ClusterSlot, error) {
		if slow.Load() {
			time.Sleep(200 * time.Millisecond)
		}
		return admin.ClusterSlots(ctx).Result()
	}
	wrdb := redis.NewClusterClient(opt)
	t.Cleanup(func() { _ = wrdb.Close() })
	wc := newClientOn(t, wrdb, redlatch.WithLogger(slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	// The waiter's Client has been in use: slot map loaded, publish command
	// probed.
	warm := wc.Mutex(name + "-warm")
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))
	_, err := wc.Mutex(name).IsLocked(ctx)
	require.NoError(t, err)

	cl.MoveSlot(t, redistest.KeySlot("{"+name+"}"), to)
	slow.Store(true)

	hc := newClientOn(t, cl.Client(t))
	holder := hc.Mutex(name, redlatch.WithLease(30*time.Second))
	require.NoError(t, holder.Lock(ctx))

	waiter := wc.Mutex(name)
	got := lockedAt(ctx, waiter)
	time.Sleep(1500 * time.Millisecond) // the waiter subscribes and sleeps
	newOwner := redis.NewClient(cl.Servers[to].Options())
	oldOwner := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = newOwner.Close(); _ = oldOwner.Close() })
	nn, _ := newOwner.Do(ctx, "PUBSUB", "SHARDNUMSUB", "{"+name+"}:wake").Slice()
	t.Logf("SHARDNUMSUB on the new master: %v", nn)

	requireWokenByRelease(t, ctx, holder, waiter, got, "the waiter slept through the release: its channel is subscribed on the slot's old master")
}

// tWriter writes a Client's log lines to the test log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// failFirstInfo fails the first INFO command sent through it, as a master
// that does not answer the Client's first version check would.
type failFirstInfo struct {
	passHook
	failed *atomic.Bool
}

func (h failFirstInfo) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "info" && h.failed.CompareAndSwap(false, true) {
			err := errors.New("injected: INFO failed")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

// TestClusterWakeAfterVersionCheckRecovers: the README says a Client whose
// first check of the masters' versions fails "subscribes and publishes with
// plain pub/sub until a check succeeds". A reader that started waiting
// while the check failed is subscribed with plain SUBSCRIBE; once a later
// check succeeds, the Client (and every other Client) publishes with
// SPUBLISH, which a plain subscription never hears. The waiter must then
// be woken by the writer's release, not sleep until the writer's lease
// (20s) runs out.
func TestClusterWakeAfterVersionCheckRecovers(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 40*time.Second)
	name := redistest.UniqueName(t)

	hc := newClient(t, b)
	var failed atomic.Bool
	c := infoHookedClient(t, b, failFirstInfo{failed: &failed})

	writer := hc.RWMutex(name, redlatch.WithLease(20*time.Second))
	require.NoError(t, writer.Lock(ctx))

	reader := c.RWMutex(name)
	got := make(chan error, 1)
	go func() {
		err := reader.RLock(ctx)
		if err == nil {
			err = reader.RUnlock(ctx)
		}
		got <- err
	}()
	require.Eventually(t, failed.Load, 5*time.Second, 10*time.Millisecond, "the version check did not run")
	time.Sleep(500 * time.Millisecond) // the reader waits, subscribed

	// A later check succeeds: any call that publishes makes one.
	_, err := c.RWMutex(name + "-other").ForceUnlock(ctx)
	require.NoError(t, err)

	released := time.Now()
	require.NoError(t, writer.Unlock(ctx))
	select {
	case err := <-got:
		require.NoError(t, err)
		t.Logf("reader woken %v after the release", time.Since(released))
	case <-time.After(3 * time.Second):
		t.Fatal("the reader slept through the writer's release: its channel is still on plain pub/sub")
	}
}

// TestClusterVersionCheckHonoursCtx: on a cluster with a master that does
// not answer, the Client's check of the masters' versions cannot succeed.
// A Lock whose ctx ends after 200ms must return then (API.md: a failed wait
// returns with ctx's error), and an Unlock must not outlive its ctx by
// seconds either: both ran the check under a fresh 2s context, serialised
// behind one mutex, whatever their own ctx said. Found by a reviewer.
func TestClusterVersionCheckHonoursCtx(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)

	holder := newClient(t, b).Mutex(name, redlatch.WithLease(20*time.Second))
	require.NoError(t, holder.Lock(ctx))
	t.Cleanup(func() { _ = holder.Unlock(context.Background()) })

	c := infoHookedClient(t, b, stallInfo())

	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.Mutex(name).Lock(short)
	took := time.Since(start)
	requireWaitErr(t, err, short)
	require.Less(t, took, time.Second, "Lock with a 200ms ctx returned after %v", took)

	other := c.Mutex(name + "-other")
	require.NoError(t, other.Lock(ctx))
	short2, cancel2 := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel2()
	start = time.Now()
	_ = other.Unlock(short2)
	took = time.Since(start)
	require.Less(t, took, time.Second, "Unlock with a 200ms ctx returned after %v", took)
}

// TestClusterCleanupNotStarvedByVersionCheck: on a cluster with a master
// that does not answer (not the lock's), a Client whose check of the
// masters' versions has not succeeded yet runs that check again in every
// publishing call, a cleanup too. A cleanup runs under a fresh context
// bounded by cleanupTimeout (2s), which the check, now bounded by that
// same context, takes whole: the cleanup's own script is then never sent.
// Here a FairMutex Lock whose ctx ends in the queue must withdraw its place
// (API: a failed wait leaves nothing behind); the place stayed, the
// holder's Unlock granted the lock to it, and a waiter of a healthy Client
// waited for that stale grant to run out (the watchdog timeout, 30s). The
// check now takes at most half of what is left of its caller's ctx. Found
// by a reviewer.
func TestClusterCleanupNotStarvedByVersionCheck(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 60*time.Second)
	name := redistest.UniqueName(t)

	holder := newClient(t, b).FairMutex(name)
	require.NoError(t, holder.Lock(ctx))

	c := infoHookedClient(t, b, stallInfo())

	wctx, cancel := context.WithTimeout(ctx, 6*time.Second)
	defer cancel()
	requireWaitErr(t, c.FairMutex(name).Lock(wctx), wctx)
	// The withdrawal ran before Lock returned: the queue must be empty.
	n, err := b.Client(t).ZCard(ctx, "{"+name+"}:fairq").Result()
	require.NoError(t, err)
	require.Zero(t, n, "the withdrawn waiter's place is still queued")

	require.NoError(t, holder.Unlock(ctx))
	next := newClient(t, b).FairMutex(name)
	nctx, ncancel := context.WithTimeout(ctx, 3*time.Second)
	defer ncancel()
	require.NoError(t, next.Lock(nctx), "the lock went to the withdrawn waiter's stale place")
	require.NoError(t, next.Unlock(ctx))
}

// TestClusterVersionCheckHalfCtxLosesWakeUp: on a healthy Redis 7 cluster,
// a Client's first publishing call is an Unlock with a 1.2s ctx, and its
// masters answer INFO in 700ms. The version check fits in the ctx, but it
// was bounded by half of it (600ms, meant for cleanups only): it failed, the Unlock picks PUBLISH
// and its script (sent in the other half) releases the lock and publishes
// the wake-up on plain pub/sub, which the waiter of another Client,
// subscribed with SSUBSCRIBE, did not hear: it slept to its lease bound
// (20s here) while the lock is free. The Unlock reported success, and
// nothing failed that the caller could see. Found by the reread of the
// fix that bounded the check.
func TestClusterVersionCheckHalfCtxLosesWakeUp(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 40*time.Second)
	name := redistest.UniqueName(t)

	// The waiter's Client has checked the versions (a publishing call): it
	// subscribes with SSUBSCRIBE.
	hc := newClient(t, b)
	warm := hc.Mutex(name + "-warm")
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))

	c := infoHookedClient(t, b, delayHook{match: isInfo, d: 700 * time.Millisecond})

	holder := c.Mutex(name, redlatch.WithLease(20*time.Second))
	require.NoError(t, holder.Lock(ctx)) // uncontended: no version check

	waiter := hc.Mutex(name)
	got := make(chan error, 1)
	go func() { got <- waiter.Lock(ctx) }()
	time.Sleep(500 * time.Millisecond) // the waiter attempts and subscribes

	short, cancel := context.WithTimeout(ctx, 1200*time.Millisecond)
	defer cancel()
	require.NoError(t, holder.Unlock(short))
	released := time.Now()
	select {
	case err := <-got:
		require.NoError(t, err)
		t.Logf("waiter woken %v after the release", time.Since(released))
		require.NoError(t, waiter.Unlock(ctx))
	case <-time.After(3 * time.Second):
		t.Fatal("the waiter slept through the release: the Unlock published on plain pub/sub")
	}
}

// TestClusterUnlockShortCtxUnderStalledVersionCheck: on a cluster one of
// whose masters does not answer (not the lock's), a Client whose version
// check has not succeeded runs it again in every publishing call. The
// README says such a Client "subscribes and publishes with plain pub/sub
// until a check succeeds". An Unlock with a 1s ctx, on a lock whose master
// answers at once, must release the lock. When a call's check took the
// whole of its ctx, the check failed when ctx ended, the Unlock's script
// was never sent (ctx was over), and the lock stayed held
// by nobody until its lease runs out (20s here), every waiter stalled. Any
// Unlock, FairMutex Lock, Release or CountDown with a ctx under 2s failed
// the same way, for a master that has nothing to do with it. The check
// now leaves at most 200ms of a call's ctx for the call itself. Found by a
// reviewer.
func TestClusterUnlockShortCtxUnderStalledVersionCheck(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)

	c := infoHookedClient(t, b, stallInfo())

	m := c.Mutex(name, redlatch.WithLease(20*time.Second))
	require.NoError(t, m.Lock(ctx)) // uncontended: no version check
	short, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	err := m.Unlock(short)
	locked, lerr := newClient(t, b).Mutex(name).IsLocked(ctx)
	require.NoError(t, lerr)
	require.False(t, locked, "an Unlock with a 1s ctx left the lock held (Unlock: %v)", err)
	require.NoError(t, err)
}

// TestClusterUnlockShortCtxBehindAnotherVersionCheck: as
// TestClusterUnlockShortCtxUnderStalledVersionCheck, but the Unlock with a
// 1s ctx comes while another call of the same Client (an Unlock of another
// lock, whose ctx is long) runs the version check. The short Unlock waits
// for that check on c.probing for the whole of its ctx (the check keeps no
// reserve there), its script is never sent, and its lock stays held by
// nobody for its lease. The wait now keeps the reserve too. Found by a
// reviewer.
func TestClusterUnlockShortCtxBehindAnotherVersionCheck(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)

	entered := make(chan struct{})
	hook := delayHook{match: isInfo, once: new(sync.Once), entered: entered}
	c := infoHookedClient(t, b, hook)

	m1 := c.Mutex(name+"-a", redlatch.WithLease(20*time.Second))
	m2 := c.Mutex(name+"-b", redlatch.WithLease(20*time.Second))
	require.NoError(t, m1.Lock(ctx)) // uncontended: no version check
	require.NoError(t, m2.Lock(ctx))

	first := make(chan error, 1)
	go func() { first <- m1.Unlock(ctx) }() // its check takes up to 2s
	<-entered

	short, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	err := m2.Unlock(short)
	locked, lerr := newClient(t, b).Mutex(name + "-b").IsLocked(ctx)
	require.NoError(t, lerr)
	require.False(t, locked, "an Unlock with a 1s ctx left the lock held (Unlock: %v)", err)
	require.NoError(t, err)
	require.NoError(t, <-first)
}

// TestCloseNotHeldUpByVersionCheck: on a cluster one of whose masters
// does not answer, a blocking Lock on a held lock joins the wake-up channel,
// which runs the version check first (up to 2s). Close ends the wait, but
// not the check: Close waits for the Lock (registered) until the check
// times out, though the Lock took nothing and has nothing to give back,
// and the Lock returns ErrClosed only then. Close now ends a check made
// before anything is taken. Found by a reviewer.
func TestCloseNotHeldUpByVersionCheck(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)

	for _, kind := range []string{"reentrant", "rlock", "fair"} {
		t.Run(kind, func(t *testing.T) {
			entered := make(chan struct{})
			c := infoHookedClient(t, b, delayHook{match: isInfo, once: new(sync.Once), entered: entered})
			closeDuringVersionCheck(t, ctx, name+kind, kind, b, c, entered)
		})
	}
}

// closeDuringVersionCheck closes c while a blocking Lock of the kind on c
// runs its version check (entered is closed when the check begins), and
// requires Close and the Lock's ErrClosed both within a second.
func closeDuringVersionCheck(t *testing.T, ctx context.Context, name, kind string, b redistest.Backend,
	c *redlatch.Client, entered chan struct{}) {
	other := newClient(t, b)
	var lock func() error
	switch kind {
	case "reentrant":
		h := other.Mutex(name, redlatch.WithLease(20*time.Second))
		require.NoError(t, h.Lock(ctx))
		t.Cleanup(func() { _ = h.Unlock(context.Background()) })
		lock = func() error { return c.ReentrantMutex(name).Lock(ctx) }
	case "rlock":
		h := other.RWMutex(name, redlatch.WithLease(20*time.Second))
		require.NoError(t, h.Lock(ctx))
		t.Cleanup(func() { _ = h.Unlock(context.Background()) })
		lock = func() error { return c.RWMutex(name).RLock(ctx) }
	case "fair":
		h := other.FairMutex(name, redlatch.WithLease(20*time.Second))
		require.NoError(t, h.Lock(ctx))
		t.Cleanup(func() { _ = h.Unlock(context.Background()) })
		lock = func() error { return c.FairMutex(name).Lock(ctx) }
	}

	got := make(chan error, 1)
	go func() { got <- lock() }()
	<-entered                         // the Lock's join runs the version check
	time.Sleep(50 * time.Millisecond) // its INFO is on the way
	start := time.Now()
	require.NoError(t, c.Close())
	took := time.Since(start)
	err := <-got
	returned := time.Since(start)
	require.ErrorIs(t, err, redlatch.ErrClosed)
	require.Less(t, took, time.Second, "Close waited %v for a Lock in the version check", took)
	require.Less(t, returned, time.Second, "the Lock returned ErrClosed %v after Close", returned)
}

// infoHookedClient returns a Client on a new cluster client of b whose
// nodes all run hook (an INFO that fails, stalls or is slow: the Client's
// check of the masters' versions), closed by t.Cleanup.
func infoHookedClient(t *testing.T, b redistest.Backend, hook redis.Hook) *redlatch.Client {
	t.Helper()
	cc := redis.NewClusterClient(b.Cluster.Options())
	t.Cleanup(func() { _ = cc.Close() })
	cc.OnNewNode(func(n *redis.Client) { n.AddHook(hook) })
	c := newClientOn(t, cc)
	return c
}

// seeInfo passes every command on, and once armed closes entered at the
// first INFO or CLUSTER (SLOTS): the start of the Client's version check
// (ForEachMaster reloads the slot map first, from any node).
type seeInfo struct {
	passHook
	once    *sync.Once
	entered chan struct{}
	armed   *atomic.Bool
}

func (h seeInfo) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if n := cmd.Name(); h.armed.Load() && (n == "info" || n == "cluster") {
			h.once.Do(func() { close(h.entered) })
		}
		return next(ctx, cmd)
	}
}

// TestCloseNotHeldUpByFrozenMasterVersionCheck: as
// TestCloseNotHeldUpByVersionCheck, but the master that does not answer is a
// real one (its connection frozen by a Proxy, as a dead host or a SIGSTOPped
// redis-server looks), not a hook that watches ctx. go-redis does not end a
// read when its ctx is cancelled (it only sets the socket deadline from
// ctx's deadline), so cancelling the check's ctx at Close does not end the
// INFO: Close still waited for the Lock until the check's bound (2s). The
// check now runs in a goroutine of its own, which the wait leaves at Close.
// Found by a reviewer.
func TestCloseNotHeldUpByFrozenMasterVersionCheck(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 30*time.Second)
	for _, kind := range []string{"reentrant", "fair"} {
		t.Run(kind, func(t *testing.T) {
			name := redistest.UniqueName(t) + kind
			victim := b.Cluster.ServerFor(lockKey(name))
			var frozen *redistest.Server
			for _, s := range b.Cluster.Servers {
				if s != victim {
					frozen = s
					break
				}
			}
			proxy := redistest.NewProxy(t, frozen.Addr)
			opts := b.Cluster.Options()
			opts.PoolSize = 1 // the INFO takes the frozen connection
			opts.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
				if addr == frozen.Addr {
					addr = proxy.Addr
				}
				var d net.Dialer
				return d.DialContext(ctx, network, addr)
			}
			cc := redis.NewClusterClient(opts)
			t.Cleanup(func() { _ = cc.Close() })
			entered := make(chan struct{})
			hook := seeInfo{once: new(sync.Once), entered: entered, armed: new(atomic.Bool)}
			cc.OnNewNode(func(n *redis.Client) { n.AddHook(hook) })
			// One idle connection to every master, the frozen one's through
			// the proxy.
			require.NoError(t, cc.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
				return n.Ping(ctx).Err()
			}))
			// A keyed command loads the command table (COMMAND, from any
			// node) before the freeze.
			require.NoError(t, cc.Exists(ctx, lockKey(name)).Err())
			require.Equal(t, 1, proxy.Freeze())
			hook.armed.Store(true)
			c := newClientOn(t, cc)
			closeDuringVersionCheck(t, ctx, name, kind, b, c, entered)
		})
	}
}

// isInfo matches INFO, the command of the Client's check of a cluster's
// versions.
func isInfo(cmd redis.Cmder) bool { return cmd.Name() == "info" }

// stallInfo makes every INFO wait until its ctx ends, as a master that is
// frozen (SIGSTOP) or cut off by a partition would: the Client's check of
// the masters' versions never succeeds.
func stallInfo() delayHook { return delayHook{match: isInfo} }

// TestWakeAfterSlotCameBack: a waiter leaves while its channel's slot has
// just moved to another master and the Client's slot map is still the old
// one: its SUNSUBSCRIBE goes to the old master, which answers -MOVED, not
// a confirmation. When the slot later comes back to that master, the next
// waiter's SSUBSCRIBE there must still count as confirmed: the unsubscribe
// left no confirmation owed behind (it did, and the confirmation of the
// new SSUBSCRIBE passed for that older command's: the waiter's join waited
// for a confirmation that never came, and slept through the release until
// the holder's 30s lease bound).
func TestWakeAfterSlotCameBack(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 90*time.Second)
	name := redistest.UniqueName(t)
	slot := redistest.KeySlot("{" + name + "}")
	owner := cl.ServerFor("{" + name + "}")
	home, to := -1, -1
	for i, s := range cl.Servers {
		if s == owner {
			home = i
		} else {
			to = i
		}
	}
	// The waiter's slot map reloads are slow while slow is set: its
	// subscription cannot follow the slot yet when the waiter leaves.
	admin := redis.NewClient(cl.Servers[home].Options())
	t.Cleanup(func() { _ = admin.Close() })
	var slow atomic.Bool
	opt := cl.Options()
	opt.ClusterSlots = func(ctx context.Context) ([]redis.ClusterSlot, error) {
		if slow.Load() {
			time.Sleep(time.Second)
		}
		return admin.ClusterSlots(ctx).Result()
	}
	wrdb := redis.NewClusterClient(opt)
	t.Cleanup(func() { _ = wrdb.Close() })
	wc := newClientOn(t, wrdb)
	hc := newClientOn(t, cl.Client(t))

	holder := hc.Mutex(name, redlatch.WithLease(30*time.Second))
	require.NoError(t, holder.Lock(ctx))
	shardSubs := func(s *redistest.Server) int64 {
		a := redis.NewClient(s.Options())
		defer a.Close()
		return shardSubscribers(ctx, a, "{"+name+"}:wake")
	}

	// A first waiter subscribes on the slot's master, then the slot moves
	// away and the waiter gives up before its subscription follows.
	wctx, cancel := context.WithCancel(ctx)
	first := make(chan error, 1)
	go func() { first <- wc.Mutex(name).Lock(wctx) }()
	require.Eventually(t, func() bool { return shardSubs(owner) == 1 }, 5*time.Second, 10*time.Millisecond,
		"the first waiter did not subscribe")
	slow.Store(true)
	cl.MoveSlot(t, slot, to)
	time.Sleep(200 * time.Millisecond) // the old master's SUNSUBSCRIBE is read
	cancel()
	require.Error(t, <-first)
	time.Sleep(200 * time.Millisecond) // its SUNSUBSCRIBE is refused with -MOVED

	// The slot comes back, and the Client's map learns it.
	slow.Store(false)
	cl.MoveSlot(t, slot, home)
	require.Eventually(t, func() bool {
		wrdb.ReloadState(ctx)
		m, err := wrdb.MasterForKey(ctx, "{"+name+"}:wake")
		// (The nodes may name themselves without a host: ":port".)
		_, port, _ := strings.Cut(cl.Addrs[home], ":")
		return err == nil && strings.HasSuffix(m.Options().Addr, ":"+port)
	}, 10*time.Second, 50*time.Millisecond, "the waiter's Client did not learn the slot's return")

	waiter := wc.Mutex(name)
	got := lockedAt(ctx, waiter)
	require.Eventually(t, func() bool { return shardSubs(owner) == 1 }, 5*time.Second, 10*time.Millisecond,
		"the second waiter did not subscribe")
	time.Sleep(300 * time.Millisecond) // the waiter sleeps
	released := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	select {
	case at := <-got:
		require.Less(t, at.Sub(released), 2*time.Second)
	case <-time.After(8 * time.Second):
		t.Fatal("the waiter slept through the release after its channel's slot came back")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// TestWakeAfterSlotMovedWhileSubscriberDown: a waiter's sharded subscriber
// connection to the master of its lock's slot is down (a network blip)
// while that slot moves to another master, so the old master's own
// SUNSUBSCRIBE never reaches it. When the connection comes back, go-redis
// re-subscribes the channel there, and the old master answers -MOVED: the
// channel must follow the slot to its new master (as after a stale map's
// SSUBSCRIBE), and the waiter be woken by the release published there. The
// -MOVED was ignored (no command of redlatch's was owed a confirmation: the
// reconnection cleared them), and once the connection delivered again (its
// health ping) follow stopped checking the slot map: the channel stayed on
// the old master and the waiter slept until the holder's lease bound.
func TestWakeAfterSlotMovedWhileSubscriberDown(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	name := redistest.UniqueName(t)
	tag := "{" + name + "}"
	owner := cl.ServerFor(tag)
	to := 0
	for i, s := range cl.Servers {
		if s != owner {
			to = i
		}
	}
	_, ownerPort, _ := strings.Cut(owner.Options().Addr, ":")

	admin := redis.NewClient(cl.Servers[to].Options())
	t.Cleanup(func() { _ = admin.Close() })
	oadm := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = oadm.Close() })
	nadm := redis.NewClient(cl.Servers[to].Options())
	t.Cleanup(func() { _ = nadm.Close() })

	// The waiter's slot map reloads are slow while slow is set (a loaded
	// or remote node), and its dials to the old master wait while gate is
	// set (the link is down).
	var slow, gate atomic.Bool
	opt := cl.Options()
	opt.ClusterSlots = func(ctx context.Context) ([]redis.ClusterSlot, error) {
		if slow.Load() {
			time.Sleep(3500 * time.Millisecond)
		}
		return admin.ClusterSlots(ctx).Result()
	}
	opt.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
		for gate.Load() && strings.HasSuffix(addr, ":"+ownerPort) && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	wrdb := redis.NewClusterClient(opt)
	t.Cleanup(func() { _ = wrdb.Close() })
	// A watchdog timeout of 3s: the subscriber's health ping after 1s.
	wc := newClientOn(t, wrdb, redlatch.WithWatchdogTimeout(3*time.Second),
		redlatch.WithLogger(slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	warm := wc.Mutex(name + "-warm")
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))

	hc := newClientOn(t, cl.Client(t))
	holder := hc.Mutex(name, redlatch.WithLease(30*time.Second))
	require.NoError(t, holder.Lock(ctx))

	shardSubs := func(a *redis.Client) int64 { return shardSubscribers(ctx, a, tag+":wake") }
	waiter := wc.Mutex(name)
	got := lockedAt(ctx, waiter)
	require.Eventually(t, func() bool { return shardSubs(oadm) == 1 }, 5*time.Second, 10*time.Millisecond,
		"the waiter did not subscribe")
	time.Sleep(200 * time.Millisecond) // the waiter sleeps

	// The link to the old master drops, the slot moves, the link comes back.
	slow.Store(true)
	gate.Store(true)
	require.NoError(t, oadm.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err())
	cl.MoveSlot(t, redistest.KeySlot(tag), to)
	time.Sleep(100 * time.Millisecond)
	gate.Store(false)

	// Long enough for the waiter's slot map to be reloaded, and for the
	// subscription to have followed the slot.
	time.Sleep(6 * time.Second)
	t.Logf("SHARDNUMSUB: old master %d, new master %d", shardSubs(oadm), shardSubs(nadm))

	requireWokenByRelease(t, ctx, holder, waiter, got, "the waiter slept through the release: its channel stayed on the slot's old master")
}

// shardSubscribers returns how many subscribers the node a has on the
// sharded channel (PUBSUB SHARDNUMSUB), or -1 when it cannot tell.
func shardSubscribers(ctx context.Context, a *redis.Client, channel string) int64 {
	n, err := a.Do(ctx, "PUBSUB", "SHARDNUMSUB", channel).Slice()
	if err != nil || len(n) != 2 {
		return -1
	}
	v, _ := n[1].(int64)
	return v
}

// lockedAt locks m in the background and sends the time it got the lock
// (nothing when Lock fails).
func lockedAt(ctx context.Context, m *redlatch.Mutex) <-chan time.Time {
	got := make(chan time.Time, 1)
	go func() {
		if err := m.Lock(ctx); err == nil {
			got <- time.Now()
		}
	}()
	return got
}

// requireWokenByRelease unlocks holder and checks that waiter, whose Lock
// sends its time on got (see lockedAt), gets the lock within 2s of the
// release; it fails with msg when 5s pass. Then it unlocks waiter.
func requireWokenByRelease(t *testing.T, ctx context.Context, holder, waiter *redlatch.Mutex, got <-chan time.Time, msg string) {
	t.Helper()
	released := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	select {
	case at := <-got:
		t.Logf("woken %v after the release", at.Sub(released))
		require.Less(t, at.Sub(released), 2*time.Second)
	case <-time.After(5 * time.Second):
		t.Fatal(msg)
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// redis6Info makes every INFO of a node client report Redis 6.2: the
// Client's check of the masters' versions then finds a cluster of Redis < 7
// and uses plain pub/sub (PUBLISH, and a SUBSCRIBE on the cluster client),
// as it does on a real Redis 6 cluster.
type redis6Info struct{ passHook }

var redisVersionRE = regexp.MustCompile(`redis_version:[0-9.]+`)

func (redis6Info) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if sc, ok := cmd.(*redis.StringCmd); ok && err == nil && cmd.Name() == "info" {
			sc.SetVal(redisVersionRE.ReplaceAllString(sc.Val(), "redis_version:6.2.14"))
		}
		return err
	}
}

// TestClusterPlainSubscriberHalfOpenNoWriteDeadlines is
// TestWakeAfterSubscriberHalfOpen/WriteTimeout=-2 on a cluster of Redis < 7
// (plain pub/sub, the subscriber a PubSub of the *redis.ClusterClient): the
// subscriber drops an unresponsive connection by a ping written under a past
// deadline, which a cluster client with WriteTimeout -2 never sets, so the
// half-open connection stayed up and the waiter deaf until the holder's
// 60s lease.
func TestClusterPlainSubscriberHalfOpenNoWriteDeadlines(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 40*time.Second)
	name := redistest.UniqueName(t)
	v6 := func(opts *redis.ClusterOptions) *redis.ClusterClient {
		cc := redis.NewClusterClient(opts)
		t.Cleanup(func() { _ = cc.Close() })
		cc.OnNewNode(func(n *redis.Client) { n.AddHook(redis6Info{}) })
		return cc
	}
	holder := newClientOn(t, v6(b.Cluster.Options())).Mutex(name, redlatch.WithLease(60*time.Second))
	require.NoError(t, holder.Lock(ctx))

	proxies := make(map[string]*redistest.Proxy)
	for _, addr := range b.Cluster.Addrs {
		proxies[addr] = redistest.NewProxy(t, addr)
	}
	opts := b.Cluster.Options()
	opts.WriteTimeout = -2
	opts.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if p := proxies[addr]; p != nil {
			addr = p.Addr
		}
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	wc := newClientOn(t, v6(opts), redlatch.WithWatchdogTimeout(3*time.Second)) // health checks every 1s
	requireWokenThroughHalfOpen(t, ctx, b, name, holder, wc.Mutex(name), func() int {
		frozen := 0
		for _, p := range proxies {
			frozen += p.Freeze()
		}
		return frozen
	})
}
