package redlatch_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

func scriptCallsOn(s *redistest.Server, t *testing.T) int64 {
	st := redistest.InfoStats(s.Client(t))
	return int64(st["cmdstat_evalsha.calls"] + st["cmdstat_eval.calls"])
}

// TestRedlockWaiterSleepsOnPartialGrant: another owner holds a
// majority (3 of 5) for a long time; a blocked Redlock waiter gets grants
// from the 2 free masters each round. It sleeps until a release is
// published (or the holder's lease), and does not retry every few ms: its
// own undo of the minority publishes no wake-up to wake itself.
func TestRedlockWaiterSleepsOnPartialGrant(t *testing.T) {
	servers := redlockServers(t, 5)
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	holders := redlockClients(t, servers)
	for i := 0; i < 3; i++ {
		m := holders[i].Mutex(name, redlatch.WithLease(20*time.Second))
		require.NoError(t, m.Lock(ctx))
	}
	r := redlatch.NewRedlock(name, redlockClients(t, servers), redlatch.WithLease(20*time.Second))
	before := scriptCallsOn(servers[4], t)
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	err := r.Lock(wctx)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)
	calls := scriptCallsOn(servers[4], t) - before
	t.Logf("script calls on a free master during a 2s wait: %d (attempt+undo per round)", calls)
	// Two rounds (the first attempt, the retry after subscribing) cost 4
	// calls; the holder's lease is 20s, so no further round is due.
	require.LessOrEqual(t, calls, int64(8), "the waiter polls instead of waiting for a wake-up")
}

// TestRedlockUnlockWithFrozenMaster: a master is frozen (SIGSTOP), and its
// watchdog's renewal is in flight for up to a renewal period (watchdog
// timeout / 3). Redlock.Unlock, with a 300ms ctx, does not wait for that
// renewal to end:
//   - "minority": a quorum still holds; Unlock waited in watchdog.remove,
//     far past its ctx;
//   - "quorum lost": the holds on the two other masters vanish (a restart,
//     a ForceUnlock), so Lost closes while the renewal to the frozen master
//     is in flight; the quorum check stopped the renewals under the hold's
//     mutex, waiting for that renewal, and held up Unlock for seconds.
//     (Found by a reviewer.)
func TestRedlockUnlockWithFrozenMaster(t *testing.T) {
	redistest.Together(t, func(run func(string, func(*testing.T))) {
		for _, tc := range []struct {
			name         string
			lost, cancel bool
		}{
			{"minority", false, false},
			// A cancellation, not a deadline: go-redis sees only deadlines on
			// the socket, so Unlock waited for the frozen master's read timeout
			// (found by a reviewer).
			{"minority cancelled", false, true},
			{"quorum lost", true, false},
		} {
			lost := tc.lost
			run(tc.name, func(t *testing.T) {
				servers := redlockServers(t, 3)
				clients := redlockClients(t, servers, redlatch.WithWatchdogTimeout(9*time.Second)) // period 3s
				ctx := ctxT(t, 30*time.Second)
				name := redistest.UniqueName(t)
				r := redlatch.NewRedlock(name, clients)
				require.NoError(t, r.Lock(ctx))
				if lost {
					// The frozen master's Client renews first (its ticker started
					// first): its renewal is in flight when the others find their
					// holds gone.
					servers[0].Stop(t)
					t.Cleanup(func() { servers[0].Cont(t) })
					for _, s := range servers[1:] {
						require.NoError(t, s.Client(t).Del(ctx, lockKey(name)).Err())
					}
					requireClosedWithin(t, r.Lost(), 4*time.Second, "Lost after the holds on 2 of 3 masters vanished")
				} else {
					servers[2].Stop(t)
					t.Cleanup(func() { servers[2].Cont(t) })
					time.Sleep(3200 * time.Millisecond) // a renewal to the frozen master is in flight
					requireOpen(t, r.Lost(), "a quorum still renews")
				}
				uctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
				if tc.cancel {
					uctx, cancel = context.WithCancel(ctx)
					time.AfterFunc(300*time.Millisecond, cancel)
				}
				defer cancel()
				start := time.Now()
				err := r.Unlock(uctx)
				took := time.Since(start)
				t.Logf("Unlock returned %v after %v", err, took)
				if lost {
					require.ErrorIs(t, err, redlatch.ErrNotHeld)
				} else {
					require.NoError(t, err, "2 of 3 masters released it")
					require.Equal(t, []bool{false, false}, heldOn(t, ctx, servers[:2], name))
				}
				require.Less(t, took, time.Second, "Unlock outlived its 300ms ctx by far")
			})
		}
	})
}

// TestRedlockCancelMidRoundReleases: 3 of 5 masters are frozen, so no
// round can reach a quorum; Lock's ctx ends (a deadline, then a
// cancellation) while a round waits for the frozen masters. Lock returns
// about when its ctx ends, not a node timeout (1s with the default lease)
// or two later (found by a reviewer), and what the 2 live masters granted
// is released before it returns. The round's undos on the frozen masters
// go on in the background: once they thaw, the late attempts took nothing.
func TestRedlockCancelMidRoundReleases(t *testing.T) {
	servers := redlockServers(t, 5)
	clients := redlockClients(t, servers) // watchdog lease 30s: node timeout 1s
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	for _, s := range servers[2:] {
		s.Stop(t)
	}
	t.Cleanup(func() {
		for _, s := range servers[2:] {
			s.Cont(t)
		}
	})
	r := redlatch.NewRedlock(name, clients)
	for _, how := range []string{"deadline", "cancel"} {
		t.Run(how, func(t *testing.T) {
			var short context.Context
			var cancel context.CancelFunc
			if how == "deadline" {
				short, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
			} else {
				short, cancel = context.WithCancel(ctx)
				time.AfterFunc(200*time.Millisecond, cancel)
			}
			defer cancel()
			start := time.Now()
			err := r.Lock(short)
			took := time.Since(start)
			t.Logf("Lock returned after %v", took)
			requireWaitErr(t, err, short)
			require.Less(t, took, 600*time.Millisecond, "Lock outlived its 200ms ctx by far")
			require.Equal(t, []bool{false, false}, heldOn(t, ctx, servers[:2], name), "the live masters' grants were released")
		})
	}
	for _, s := range servers[2:] {
		s.Cont(t)
	}
	require.Eventually(t, func() bool {
		return !slices.Contains(heldOn(t, ctx, servers, name), true)
	}, 3*time.Second, 50*time.Millisecond, "late attempts took nothing, or their undos freed it")
}

// TestMutexUnlockWithFrozenRedis: the same for a Mutex: Unlock with a
// 300ms ctx on a frozen Redis does not wait for the watchdog's in-flight
// renewal (up to watchdog timeout / 3).
func TestMutexUnlockWithFrozenRedis(t *testing.T) {
	servers := redlockServers(t, 1)
	c := redlockClients(t, servers, redlatch.WithWatchdogTimeout(9*time.Second))[0]
	ctx := ctxT(t, 30*time.Second)
	m := c.Mutex(redistest.UniqueName(t))
	require.NoError(t, m.Lock(ctx))
	servers[0].Stop(t)
	t.Cleanup(func() { servers[0].Cont(t) })
	time.Sleep(3200 * time.Millisecond)
	took, err := callTimed(ctx, 300*time.Millisecond, m.Unlock)
	t.Logf("Unlock returned %v after %v", err, took)
	require.Less(t, took, time.Second, "Unlock outlived its 300ms ctx by far")
}

// TestRedlockLeaseBelowDrift: WithLease(2ms) is accepted, but the
// drift allowance (lease/100 + 2ms) exceeds it: no acquisition can ever be
// valid: the methods report ErrInvalidArgument (TryLock failed with
// ErrNotObtained on free masters, and Lock spun until its ctx ended).
func TestRedlockLeaseBelowDrift(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 10*time.Second)
	r := redlatch.NewRedlock(redistest.UniqueName(t), redlockClients(t, servers), redlatch.WithLease(2*time.Millisecond))
	ok, err := r.TryLock(ctx)
	t.Logf("TryLock on free masters: %v, %v", ok, err)
	before := scriptCallsOn(servers[0], t)
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	err = r.Lock(short)
	t.Logf("Lock: %v; script calls on master 0 in 500ms: %d", err, scriptCallsOn(servers[0], t)-before)
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument, "a lease under the drift allowance can never be valid")
}

// TestMutexNotQueuedBehindRedlockWaiter: a Redlock waits (another owner
// holds 2 of its 3 masters). A Mutex of the same name on the free master's
// Client finds the Redlock's waiter on that Client's channel. It must not
// queue behind it without an attempt (it was never woken: a Redlock waiter
// keeps its wake-ups while it waits on), since the lock on that master is
// free.
func TestMutexNotQueuedBehindRedlockWaiter(t *testing.T) {
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	clients, _, stop := waitingRedlock(t, ctx, name, false)
	m := clients[0].Mutex(name)
	mctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	start := time.Now()
	err := m.Lock(mctx)
	t.Logf("Mutex.Lock on the free master: %v after %v", err, time.Since(start))
	stop()
	require.NoError(t, err, "the lock on master 0 is free apart from the Redlock's brief attempts")
	require.NoError(t, m.Unlock(ctx))
}

// TestMutexWaiterNotStarvedByRedlockWaiter: the variant of
// TestMutexNotQueuedBehindRedlockWaiter that waiter.turns does not cover. On
// master 0 a Mutex of another Client holds the lock; a Redlock of the same
// name waits (oldest local waiter on clients[0]'s channel), then a Mutex of
// clients[0] attempts, fails, and sleeps on the holder's 20 s lease. The
// holder unlocks: its one wake-up reaches clients[0], signalOne gives it to
// the oldest waiter, the Redlock, which kept it (its round fails for want
// of a quorum, and its undo on master 0 is quiet), and the Mutex slept on a
// free lock until its 20 s bound. A Redlock's waiter now takes no one's
// turn: signalOne wakes it besides the oldest waiter of Client.acquire.
// (Found by a reviewer.)
func TestMutexWaiterNotStarvedByRedlockWaiter(t *testing.T) {
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	clients, holder, stop := waitingRedlock(t, ctx, name, true)
	m := clients[0].Mutex(name)
	got := make(chan error, 1)
	mctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	go func() { got <- m.Lock(mctx) }()
	time.Sleep(300 * time.Millisecond) // the Mutex attempted and sleeps
	start := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	err := <-got
	t.Logf("Mutex.Lock after the holder's Unlock: %v after %v", err, time.Since(start))
	stop()
	require.NoError(t, err, "the lock on master 0 was released, but its wake-up went to the Redlock's waiter")
	require.NoError(t, m.Unlock(ctx))
}

// waitingRedlock makes a Redlock over 3 masters wait for name: another
// Client's Mutex holds it on masters 1 and 2 (and on master 0 with
// onFirst, that hold returned), with 20 s leases. It returns the Redlock's
// Clients and stop, which ends the Redlock's wait.
func waitingRedlock(t *testing.T, ctx context.Context, name string, onFirst bool) (clients []*redlatch.Client, first *redlatch.Mutex, stop func()) {
	t.Helper()
	servers := redlockServers(t, 3)
	others := redlockClients(t, servers)
	for i := range others {
		m := others[i].Mutex(name, redlatch.WithLease(20*time.Second))
		if i == 0 && !onFirst {
			continue
		}
		require.NoError(t, m.Lock(ctx))
		if i == 0 {
			first = m
		}
	}
	clients = redlockClients(t, servers)
	r := redlatch.NewRedlock(name, clients, redlatch.WithLease(20*time.Second))
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Lock(rctx) }()
	time.Sleep(300 * time.Millisecond) // the Redlock waits, subscribed on every master
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
	}
	t.Cleanup(stop)
	return clients, first, stop
}

// TestRedlockLostAtOnceWhenClientsCloseWithFrozenMaster: Lost closes at
// once when the Clients of a quorum of masters are closed
// (TestRedlockQueuedLockEndsOnClose), also when one of those masters is
// frozen with its watchdog's renewal in flight: the close notification must
// not wait for that renewal (up to the read timeout or a renewal period).
// (Found by a reviewer.)
func TestRedlockLostAtOnceWhenClientsCloseWithFrozenMaster(t *testing.T) {
	servers := redlockServers(t, 3)
	clients := redlockClients(t, servers, redlatch.WithWatchdogTimeout(9*time.Second)) // period 3s
	ctx := ctxT(t, 30*time.Second)
	r := redlatch.NewRedlock(redistest.UniqueName(t), clients)
	require.NoError(t, r.Lock(ctx))
	servers[0].Stop(t)
	t.Cleanup(func() { servers[0].Cont(t) })
	time.Sleep(3200 * time.Millisecond) // master 0's renewal is in flight
	require.NoError(t, clients[1].Close())
	requireOpen(t, r.Lost(), "lost with 2 of 3 masters holding")
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		_ = clients[0].Close() // waits for the renewal in flight
	}()
	took := requireClosedWithin(t, r.Lost(), 5*time.Second, "Lost after a quorum of Clients closed")
	t.Logf("Lost closed %v after the second Close", took)
	<-closed
	require.Less(t, took, 500*time.Millisecond, "Lost waited for a renewal to a frozen master")
	_ = r.Unlock(ctx)
}

// TestRedlockNotReplicatedOnQuorumFailsAtOnce: WithReplicaSync's godoc
// (and README) promise that an acquisition too few replicas acknowledged
// fails with ErrNotReplicated and that "a blocking Lock returns it at once
// rather than waiting on: replication is broken, not the lock busy", and
// name Redlock's nodes among the locks covered. Over three masters with no
// replica, Redlock.Lock instead retried (attempt + undo on every master,
// about 25 rounds a second) until its ctx ended, and the error it then
// returned usually did not even match ErrNotReplicated. A minority of such
// masters is still tolerated, as unreachable ones are. (Found by a
// reviewer.)
func TestRedlockNotReplicatedOnQuorumFailsAtOnce(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	synced := redlockClients(t, servers, redlatch.WithReplicaSync(1, 20*time.Millisecond))
	r := redlatch.NewRedlock(redistest.UniqueName(t), synced, redlatch.WithLease(5*time.Second))
	lctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	start := time.Now()
	err := r.Lock(lctx)
	took := time.Since(start)
	t.Logf("Lock: %v after %v", err, took)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated)
	require.Less(t, took, time.Second, "Lock waited on although no master's replicas can acknowledge")

	// One master of three without its replicas: the two others grant it.
	plain := redlockClients(t, servers[1:])
	name := redistest.UniqueName(t)
	r = redlatch.NewRedlock(name, []*redlatch.Client{synced[0], plain[0], plain[1]}, redlatch.WithLease(5*time.Second))
	require.NoError(t, r.Lock(lctx))
	require.Equal(t, []bool{false, true, true}, heldOn(t, ctx, servers, name))
	require.NoError(t, r.Unlock(ctx))
}

// TestRedlockWaitErrorKeepsMastersErrors: a Lock whose ctx ends while two
// of three masters refuse connections returns an error matching
// ErrNotObtained and ctx.Err() that also carries the masters' errors
// (ErrNotObtained's waitError "also unwraps to the last Redis error seen
// while waiting"; lock keeps them in last for that). The sleep between
// rounds, where ctx nearly always ends, dropped them: the error read
// "context deadline exceeded" alone, as for a lock merely held by others.
// (Found by a reviewer.)
func TestRedlockWaitErrorKeepsMastersErrors(t *testing.T) {
	servers := redlockServers(t, 1)
	live := redlockClients(t, servers)
	clients := []*redlatch.Client{live[0], deadClient(t), deadClient(t)}
	r := redlatch.NewRedlock(redistest.UniqueName(t), clients, redlatch.WithLease(5*time.Second))
	ctx, cancel := context.WithTimeout(ctxT(t, 10*time.Second), 500*time.Millisecond)
	defer cancel()
	err := r.Lock(ctx)
	t.Logf("Lock: %v", err)
	requireWaitErr(t, err, ctx)
	require.Contains(t, err.Error(), "redlock master 1", "the masters' errors were dropped")
}

// nthOf matches the nth command match accepts.
func nthOf(n int32, match func(redis.Cmder) bool) func(redis.Cmder) bool {
	var seen atomic.Int32
	return func(cmd redis.Cmder) bool { return match(cmd) && seen.Add(1) == n }
}

// TestRedlockNotReplicatedAfterCtxEnded: a quorum of masters' replicas
// fail to acknowledge (ErrNotReplicated), and Lock's ctx ends while the
// round is being undone (a slow release on the master that granted it). A failed wait's error must match both
// ErrNotObtained and ctx.Err(), as a Mutex's does (failedAttempt): Redlock
// returned the masters' joined ErrNotReplicated errors alone.
func TestRedlockNotReplicatedAfterCtxEnded(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	// Load the scripts: no NOSCRIPT resend is counted below.
	warm := redlatch.NewRedlock(redistest.UniqueName(t)+"-warm", redlockClients(t, servers))
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))
	name := redistest.UniqueName(t)
	clients := make([]*redlatch.Client, len(servers))
	for i, s := range servers {
		rdb := s.Client(t)
		if i == 0 {
			// Master 0 needs no replica and grants the round: its release
			// (the round's undo, waited for) comes late.
			rdb.AddHook(delayHook{match: nthOf(1, scriptWith("{"+name+"}:wake")), d: 300 * time.Millisecond})
			clients[i] = newClientOn(t, rdb)
			continue
		}
		clients[i] = newClientOn(t, rdb, redlatch.WithReplicaSync(1, 20*time.Millisecond))
	}
	r := redlatch.NewRedlock(name, clients, redlatch.WithLease(5*time.Second))
	lctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
	defer cancel()
	err := r.Lock(lctx)
	t.Logf("Lock: %v", err)
	require.Error(t, lctx.Err(), "the ctx had not ended")
	requireWaitErr(t, err, lctx)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated, "the masters' errors were dropped")
}

// TestRedlockUnlockCtxEndsMidCall: a Redlock Unlock whose ctx ends while
// the releases to 2 of 3 masters are in flight (they never arrived) fails,
// and the Redlock no longer renews the hold: those releases must still
// reach the masters. They did not: the lock stayed taken on a quorum by
// nobody for its whole lease (30s), and another Redlock could not take it.
func TestRedlockUnlockCtxEndsMidCall(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	clients := make([]*redlatch.Client, len(servers))
	armed := make([]atomic.Bool, len(servers)) // a release held back until its ctx ends
	for i, s := range servers {
		rdb := s.Client(t)
		rdb.AddHook(delayHook{match: armedOnce(&armed[i], scriptOn(name))})
		c := newClientOn(t, rdb)
		clients[i] = c
	}
	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	armed[1].Store(true)
	armed[2].Store(true)
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err := r.Unlock(short)
	cancel()
	t.Logf("Unlock: %v", err)
	require.Error(t, err)
	other := redlatch.NewRedlock(name, redlockClients(t, servers))
	octx, ocancel := context.WithTimeout(ctx, 2*time.Second)
	defer ocancel()
	require.NoError(t, other.Lock(octx), "the Unlock whose ctx ended mid-call left the lock taken")
	require.NoError(t, other.Unlock(ctx))
}

// TestRedlockUnlockCtxEndsMidUndo: the reply of master 2 to Lock's attempt
// is lost (it granted the lock, but answered after the node timeout), so
// the Redlock holds masters 0 and 1, and its Unlock undoes the acquisition
// on master 2. That Unlock's ctx ends while the undo is on its way (it
// never reached master 2). As for the releases of the granting masters
// (TestRedlockUnlockCtxEndsMidCall), the undo must still reach master 2:
// it was not sent again, and master 2 stayed locked by nobody for the
// whole lease (30s), refusing a Mutex of the same name there.
func TestRedlockUnlockCtxEndsMidUndo(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	wake := "{" + name + "}:wake"
	isAttempt := func(cmd redis.Cmder) bool { return scriptOn(name)(cmd) && !scriptWith(wake)(cmd) }
	var lateReply, heldUndo atomic.Bool
	clients := redlockClients(t, servers[:2])
	rdb := servers[2].Client(t)
	// The attempt runs on master 2, but its reply comes after the node
	// timeout (1s with the default 30s lease).
	rdb.AddHook(delayHook{match: armedOnce(&lateReply, isAttempt), d: 3 * time.Second, late: true})
	// The undo is held back until its ctx ends: it never reaches master 2.
	rdb.AddHook(delayHook{match: armedOnce(&heldUndo, scriptWith(wake))})
	clients = append(clients, newClientOn(t, rdb))
	// Load the scripts: the hooks below must see the scripts' runs, not
	// a NOSCRIPT reply and the resend.
	warm := redlatch.NewRedlock(name+"-warm", clients)
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))
	r := redlatch.NewRedlock(name, clients)
	lateReply.Store(true)
	require.NoError(t, r.Lock(ctx))
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, servers, name), "master 2 granted the attempt whose reply was lost")
	heldUndo.Store(true)
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err := r.Unlock(short)
	cancel()
	t.Logf("Unlock: %v", err)
	require.False(t, heldUndo.Load(), "the undo was not sent to master 2")
	require.Eventually(t, func() bool {
		return !slices.Contains(heldOn(t, ctx, servers, name), true)
	}, 3*time.Second, 50*time.Millisecond, "the undo whose ctx ended mid-call left master 2 locked by nobody")
	m := redlockClients(t, servers[2:])[0].Mutex(name)
	ok, err := m.TryLock(ctx)
	require.NoError(t, err)
	require.True(t, ok, "a Mutex on master 2 was refused")
	require.NoError(t, m.Unlock(ctx))
}

// heldWithFrozenMaster starts 3 masters, takes a Redlock of a new name on
// them, then freezes master 2; thaw resumes it (else the test's cleanup
// does).
func heldWithFrozenMaster(t *testing.T) (ctx context.Context, servers []*redistest.Server, clients []*redlatch.Client, name string, held *redlatch.Redlock, thaw func()) {
	t.Helper()
	servers = redlockServers(t, 3)
	clients = redlockClients(t, servers)
	ctx = ctxT(t, 30*time.Second)
	name = redistest.UniqueName(t)
	held = redlatch.NewRedlock(name, clients)
	require.NoError(t, held.Lock(ctx))
	servers[2].Stop(t)
	var once sync.Once
	thaw = func() { once.Do(func() { servers[2].Cont(t) }) }
	t.Cleanup(thaw)
	return ctx, servers, clients, name, held, thaw
}

// TestRedlockUnlockReturnsAtQuorumWithFrozenMaster: with one of 3 masters
// frozen, Unlock with no deadline returns once the 2 others confirmed the
// release and the attempt timeout (1s at the default 30s lease) passed, as
// an acquisition does; it waited for the frozen master's own bound, four
// attempt timeouts. The release to the frozen master goes on in the
// background and frees it once it thaws.
func TestRedlockUnlockReturnsAtQuorumWithFrozenMaster(t *testing.T) {
	ctx, servers, _, name, r, thaw := heldWithFrozenMaster(t)
	start := time.Now()
	require.NoError(t, r.Unlock(context.Background()), "2 of 3 masters released it")
	took := time.Since(start)
	t.Logf("Unlock took %v", took)
	require.Less(t, took, 2500*time.Millisecond, "Unlock waited for the frozen master")
	require.Equal(t, []bool{false, false}, heldOn(t, ctx, servers[:2], name))
	thaw()
	require.Eventually(t, func() bool {
		return !heldOn(t, ctx, servers[2:], name)[0]
	}, 5*time.Second, 50*time.Millisecond, "the release to the thawed master")
}

// TestRedlockTryLockWithFrozenMaster: another owner holds the lock on 3
// masters, one of which then freezes. A TryLock fails on the 2 that answer
// and gets no reply from the frozen one within the attempt timeout (1s at
// the default lease); it returns then, (false, nil), without waiting
// another attempt timeout for the undo of its attempt on the frozen master
// (which goes on in the background): no round follows that it could
// block.
func TestRedlockTryLockWithFrozenMaster(t *testing.T) {
	ctx, _, clients, name, holder, thaw := heldWithFrozenMaster(t)
	start := time.Now()
	ok, err := redlatch.NewRedlock(name, clients).TryLock(ctx)
	took := time.Since(start)
	t.Logf("TryLock: %v, %v after %v", ok, err, took)
	require.NoError(t, err)
	require.False(t, ok)
	require.Less(t, took, 1700*time.Millisecond, "TryLock waited for the undo on the frozen master")
	thaw()
	require.NoError(t, holder.Unlock(ctx))
}

// TestRedlockEndedCtxUnlockSlowMaster: a deferred Unlock whose ctx
// has ended already runs on a fresh cleanup context (2s). Master 2's
// release is slow (1.5s on its way). Unlock returns at quorum after the
// attempt timeout (1s), and its cleanup context, cancelled on return, cut
// the release to master 2 short: a release sent with a cleanup context is
// not resent, so master 2 stayed locked by nobody for the whole lease.
func TestRedlockEndedCtxUnlockSlowMaster(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	wake := "{" + name + "}:wake"
	var slow atomic.Bool
	clients := redlockClients(t, servers[:2])
	rdb := servers[2].Client(t)
	rdb.AddHook(delayHook{match: armedOnce(&slow, func(cmd redis.Cmder) bool {
		return scriptOn(name)(cmd) && scriptWith(wake)(cmd)
	}), d: 1500 * time.Millisecond})
	clients = append(clients, newClientOn(t, rdb))
	warm := redlatch.NewRedlock(name+"-warm", clients)
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))
	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	slow.Store(true)
	ended, cancel := context.WithCancel(ctx)
	cancel()
	require.NoError(t, r.Unlock(ended))
	require.False(t, slow.Load(), "the release to master 2 was not sent")
	require.Eventually(t, func() bool {
		return !slices.Contains(heldOn(t, ctx, servers, name), true)
	}, 4*time.Second, 50*time.Millisecond, "master 2 stayed locked after Unlock")
}

// redlockWithSlowUndo returns a test ctx and a Redlock r over 3 masters
// of which master 0 is held by another owner (Mutex m, to unlock at the
// end), armed so that r's next attempt on master 2 gets its reply after 3s
// (lateReply is cleared once it is sent) and its next release there (the
// undo of that round) takes undoDelay on its way.
func redlockWithSlowUndo(t *testing.T, undoDelay time.Duration) (context.Context, *redlatch.Redlock, *redlatch.Mutex, *atomic.Bool) {
	t.Helper()
	return redlockOverLateMaster(t, func(_, isUndo func(redis.Cmder) bool) (func(), []redis.Hook) {
		slowUndo := new(atomic.Bool)
		return func() { slowUndo.Store(true) }, []redis.Hook{delayHook{match: armedOnce(slowUndo, isUndo), d: undoDelay}}
	})
}

// requireRetakesOwnRound requires r's TryLock to succeed (why: what
// refused it otherwise) and then releases r and the other owner's m.
func requireRetakesOwnRound(t *testing.T, ctx context.Context, r *redlatch.Redlock, m *redlatch.Mutex, why string) {
	t.Helper()
	ok, err := r.TryLock(ctx)
	t.Logf("TryLock: %v, %v", ok, err)
	require.NoError(t, err)
	require.True(t, ok, why)
	require.NoError(t, r.Unlock(ctx))
	require.NoError(t, m.Unlock(ctx))
}

// redlockOverLateMaster is redlockWithSlowUndo with the hooks of master 2's
// Client (after the late reply's) given by hooks, from the matchers of r's
// attempts and of its releases there; its arm is called once the warm-up
// is over.
func redlockOverLateMaster(t *testing.T, hooks func(isAttempt, isUndo func(redis.Cmder) bool) (arm func(), hs []redis.Hook)) (context.Context, *redlatch.Redlock, *redlatch.Mutex, *atomic.Bool) {
	t.Helper()
	lm := newLateMaster(t, hooks)
	require.NoError(t, lm.m.Lock(lm.ctx))
	lm.lateReply.Store(true)
	lm.arm()
	return lm.ctx, lm.r, lm.m, lm.lateReply
}

// lateMaster is a Redlock r over 3 masters whose Client of master 2 can
// make r's next attempt there get its reply after 3s (lateReply, cleared
// once it is sent), with hooks of the test's after it (see
// redlockOverLateMaster), warmed up; m is another owner's Mutex of the
// name on master 0, not taken.
type lateMaster struct {
	ctx       context.Context
	r         *redlatch.Redlock
	m         *redlatch.Mutex
	servers   []*redistest.Server
	name      string
	lateReply *atomic.Bool
	arm       func()
}

func newLateMaster(t *testing.T, hooks func(isAttempt, isUndo func(redis.Cmder) bool) (arm func(), hs []redis.Hook)) *lateMaster {
	t.Helper()
	lm := &lateMaster{servers: redlockServers(t, 3), ctx: ctxT(t, 20*time.Second), name: redistest.UniqueName(t), lateReply: new(atomic.Bool)}
	wake := "{" + lm.name + "}:wake"
	isAttempt := func(cmd redis.Cmder) bool { return scriptOn(lm.name)(cmd) && !scriptWith(wake)(cmd) }
	clients := redlockClients(t, lm.servers[:2])
	rdb := lm.servers[2].Client(t)
	rdb.AddHook(delayHook{match: armedOnce(lm.lateReply, isAttempt), d: 3 * time.Second, late: true})
	var hs []redis.Hook
	lm.arm, hs = hooks(isAttempt, scriptWith(wake))
	for _, h := range hs {
		rdb.AddHook(h)
	}
	clients = append(clients, newClientOn(t, rdb))
	warm := redlatch.NewRedlock(lm.name+"-warm", clients)
	require.NoError(t, warm.Lock(lm.ctx))
	require.NoError(t, warm.Unlock(lm.ctx))
	lm.m = clients[0].Mutex(lm.name)
	lm.r = redlatch.NewRedlock(lm.name, clients)
	return lm
}

// TestRedlockTryLockAfterFailedTryLock: another owner holds master 0
// (a Mutex). A TryLock gets master 1, and master 2 grants it too but its
// reply comes after the attempt timeout: the round fails and is undone; the
// undo on master 2 takes 400ms on its way. A second TryLock of the handle
// right after must not be refused by the handle's own grant of the first
// round on master 2, which TryLock no longer waited to see undone: it
// reported (false, nil), "other owners hold it", while only master 0 was
// taken by another owner.
func TestRedlockTryLockAfterFailedTryLock(t *testing.T) {
	ctx, r, m, _ := redlockWithSlowUndo(t, 400*time.Millisecond)
	ok, err := r.TryLock(ctx)
	t.Logf("first TryLock: %v, %v", ok, err)
	require.False(t, ok)
	requireRetakesOwnRound(t, ctx, r, m, "refused by its own grant of the previous round")
}

// TestRedlockTryLockAfterLockCtxEnded: TestRedlockTryLockAfterFailedTryLock
// for a Lock whose ctx ends mid-round. Another owner holds master 0 (a
// Mutex); master 1 grants the Lock, and master 2 grants it too but its reply
// is held back until the Lock's 300ms ctx ends: the round fails and is
// undone, the undo on master 2 taking 400ms on its way. Lock returns with
// its ctx; a TryLock of the handle right after must not be refused by the
// handle's own grant of that round on master 2: it reported (false, nil),
// "other owners hold it", while only master 0 was taken by another owner.
func TestRedlockTryLockAfterLockCtxEnded(t *testing.T) {
	ctx, r, m, lateReply := redlockWithSlowUndo(t, 400*time.Millisecond)
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	err := r.Lock(short)
	t.Logf("Lock: %v", err)
	requireWaitErr(t, err, short)
	require.False(t, lateReply.Load(), "the attempt on master 2 was not sent")
	requireRetakesOwnRound(t, ctx, r, m, "refused by its own grant of the Lock's round")
}

// TestCloseWaitsForRedlockStragglerRelease: a Redlock's Unlock returns once
// a quorum released and the attempt timeout passed; the release to a slow
// master goes on in the background. Close must wait for it (as for the
// releases resent in the background), "so that the Redis client may be
// closed next": closing the Redis client right after Close must not cut
// that release, which left the slow master locked by nobody for the lease.
func TestCloseWaitsForRedlockStragglerRelease(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	clients := redlockClients(t, servers[:2])
	slow := servers[2].Client(t)
	hook := &gateScriptHook{match: scriptWith("{" + name + "}:wake"),
		entered: make(chan struct{}), proceed: make(chan struct{})}
	slow.AddHook(hook)
	clients = append(clients, newClientOn(t, slow))
	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	hook.armed.Store(true)
	require.NoError(t, r.Unlock(ctx)) // the slow master's release is held in the hook
	select {
	case <-hook.entered:
	default:
		t.Fatal("the slow master's release was not sent")
	}
	go func() {
		time.Sleep(300 * time.Millisecond) // the slow master answers
		close(hook.proceed)
	}()
	for _, c := range clients {
		require.NoError(t, c.Close())
	}
	require.NoError(t, slow.Close()) // allowed once Close has returned
	time.Sleep(500 * time.Millisecond)
	n, err := servers[2].Client(t).Exists(ctx, lockKey(name)).Result()
	require.NoError(t, err)
	require.Zero(t, n, "the slow master's release was cut by closing the Redis client after Close: it stays locked for its lease")
}

// TestRedlockUndoWaitSurvivesEndedCtx: as TestRedlockTryLockAfterFailedTryLock,
// the handle's failed TryLock leaves an undo on master 2 on its way (700ms).
// A Lock of the handle from another goroutine, whose 100ms ctx ends while it
// waits for that undo, took the pending undo from the handle and dropped
// it: the next TryLock no longer waited for it and was refused by the
// handle's own grant of the first round, reporting (false, nil) while only
// master 0 is taken by another owner.
func TestRedlockUndoWaitSurvivesEndedCtx(t *testing.T) {
	ctx, r, m, _ := redlockWithSlowUndo(t, 700*time.Millisecond)
	ok, err := r.TryLock(ctx)
	t.Logf("first TryLock: %v, %v", ok, err)
	require.False(t, ok)

	done := make(chan error, 1)
	go func() {
		short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		done <- r.Lock(short)
	}()
	err = <-done
	t.Logf("Lock with a short ctx: %v", err)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)

	requireRetakesOwnRound(t, ctx, r, m, "refused by its own grant of the first round: the pending undo was dropped by the Lock whose ctx ended")
}

// cancelAfterHook runs a matching call, then cancels (once armed).
type cancelAfterHook struct {
	passHook
	match  func(redis.Cmder) bool
	cancel func()
}

func (h cancelAfterHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if h.match(cmd) {
			h.cancel()
		}
		return err
	}
}

// TestRedlockUndoOfEarlierRoundWaitedForAfterLockCtxEnded: as
// TestRedlockTryLockAfterLockCtxEnded, but the Lock's ctx ends in its second
// round, not its first. Master 0 is held by another owner; in round 1
// master 1 grants, master 2 grants but its reply comes after the attempt
// timeout, and the undo there is held back. Round 1's release returns at
// the attempt timeout with the ctx alive, so it records nothing ("a round
// follows"); round 2 is refused on master 2 by round 1's grant, and the ctx
// ends there. Lock records only round 2's undos: the handle's next TryLock
// does not wait for round 1's undo on master 2 and is refused by the
// handle's own grant of round 1, reporting (false, nil) while only master 0
// is taken by another owner.
func TestRedlockUndoOfEarlierRoundWaitedForAfterLockCtxEnded(t *testing.T) {
	var cancel context.CancelFunc
	secondAttempt := new(atomic.Bool)
	gate := &gateScriptHook{entered: make(chan struct{}), proceed: make(chan struct{})}
	ctx, r, m, _ := redlockOverLateMaster(t, func(isAttempt, isUndo func(redis.Cmder) bool) (func(), []redis.Hook) {
		gate.match = isUndo
		// Round 2's attempt on master 2 (the first after round 1's undo
		// was held) ends the Lock's ctx once answered.
		cancelHook := cancelAfterHook{match: armedOnce(secondAttempt, isAttempt), cancel: func() { cancel() }}
		return func() { gate.armed.Store(true) }, []redis.Hook{gate, cancelHook}
	})
	short, cancelShort := context.WithCancel(ctx)
	cancel = cancelShort
	defer cancel()
	go func() {
		<-gate.entered // round 1's undo on master 2 is held
		secondAttempt.Store(true)
	}()

	err := r.Lock(short)
	t.Logf("Lock: %v", err)
	requireWaitErr(t, err, short)
	select {
	case <-gate.entered:
	default:
		t.Fatal("round 1's undo on master 2 was not sent")
	}
	require.False(t, secondAttempt.Load(), "no second round reached master 2")
	go func() {
		time.Sleep(300 * time.Millisecond) // round 1's undo reaches master 2
		close(gate.proceed)
	}()
	requireRetakesOwnRound(t, ctx, r, m, "refused by its own grant of the Lock's first round on master 2")
}

// TestRedlockTryLockAfterUnlockWithSlowUndo: a Redlock's Lock gets
// masters 0 and 1; master 2 grants it too but its reply comes after the
// attempt timeout, so the hold does not count it. Unlock releases masters
// 0 and 1 and undoes the acquisition on master 2, where the undo takes
// 1.5s on its way: Unlock returns at quorum after the attempt timeout
// (1s), the undo still on its way. Another owner then takes master 0. The
// handle's next TryLock must not be refused by the handle's own grant of
// its last hold on master 2: it reported (false, nil), "other owners hold
// it", while only master 0 was taken by another owner.
func TestRedlockTryLockAfterUnlockWithSlowUndo(t *testing.T) {
	slowUndo := new(atomic.Bool)
	lm := newLateMaster(t, func(_, isUndo func(redis.Cmder) bool) (func(), []redis.Hook) {
		return func() {}, []redis.Hook{delayHook{match: armedOnce(slowUndo, isUndo), d: 1500 * time.Millisecond}}
	})
	ctx, r := lm.ctx, lm.r
	lm.lateReply.Store(true)
	require.NoError(t, r.Lock(ctx))
	require.False(t, lm.lateReply.Load(), "the attempt on master 2 was not sent")
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, lm.servers, lm.name))
	slowUndo.Store(true)
	start := time.Now()
	require.NoError(t, r.Unlock(ctx))
	t.Logf("Unlock took %v", time.Since(start))
	require.False(t, slowUndo.Load(), "the undo on master 2 was not sent")
	require.Equal(t, []bool{false, false, true}, heldOn(t, ctx, lm.servers, lm.name), "the undo on master 2 is still on its way")

	require.NoError(t, lm.m.Lock(ctx))
	requireRetakesOwnRound(t, ctx, r, lm.m, "refused by its own grant of its last hold on master 2")
}

// TestRedlockLockAfterUnlockWithFrozenMaster: with one of 3 masters frozen
// (SIGSTOP), a Redlock keeps working: each Lock waits the attempt timeout
// (1s at the default 30s lease) for the frozen master's reply, and takes
// the lock on the 2 others. Unlock returns at quorum with its release to
// the frozen master still on its way; the handle's next Lock waited
// another full attempt timeout for that release before sending its round,
// so every Lock of the handle took two attempt timeouts instead of one.
func TestRedlockLockAfterUnlockWithFrozenMaster(t *testing.T) {
	ctx, _, _, _, r, thaw := heldWithFrozenMaster(t)
	ctx, cancel := context.WithTimeout(ctx, 25*time.Second)
	defer cancel()
	require.NoError(t, r.Unlock(ctx), "2 of 3 masters released it")
	for i := 0; i < 2; i++ {
		start := time.Now()
		require.NoError(t, r.Lock(ctx), "2 of 3 masters grant it")
		took := time.Since(start)
		t.Logf("Lock %d took %v", i, took)
		// One attempt timeout (1s) for the frozen master's reply; two
		// when the Lock first waited for the last Unlock's release there.
		require.Less(t, took, 1800*time.Millisecond, "Lock waited for the release to the frozen master")
		require.NoError(t, r.Unlock(ctx), "2 of 3 masters released it")
	}
	thaw()
}

// TestRedlockTryLockRetryNotRefusedByItsFirstRound: a Redlock's Unlock
// returns at quorum with its release to master 2 still on its way (held
// back). Another owner then takes master 0. The handle's TryLock sends its
// first round at once: master 0 is busy, master 2 refuses it (the handle's
// own last hold, its release on its way), and master 1 grants it but the
// reply is lost (the outcome unknown): the round fails, and its undo on
// master 1 is on its way (300ms), not waited for by a TryLock's release.
// The release to master 2 then lands, and TryLock tries the round again at
// once: master 1 refused it, held by the handle's own grant of the first
// round, and TryLock reported (false, nil), "other owners hold it", while
// only master 0 is taken by another owner. The retry must wait for the
// first round's undos too (they come well within the attempt timeout).
func TestRedlockTryLockRetryNotRefusedByItsFirstRound(t *testing.T) {
	rig := newRedlockRig(t, 20*time.Second)
	ctx, servers, name := rig.ctx, rig.servers, rig.name
	// Master 1: the first attempt once armed runs but its reply is lost;
	// the next release (the undo of that round) is held back.
	lost := &lossyHook{match: rig.isAttempt}
	undoGate := &gateScriptHook{match: rig.isRelease, entered: make(chan struct{}), proceed: make(chan struct{})}
	// Master 2: the next release once armed (Unlock's) is held back.
	relGate := &gateScriptHook{match: rig.isRelease, entered: make(chan struct{}), proceed: make(chan struct{})}
	clients := rig.clients(t, nil, []redis.Hook{lost, undoGate}, []redis.Hook{relGate})

	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	relGate.armed.Store(true)
	require.NoError(t, r.Unlock(ctx), "2 of 3 masters released it")
	select {
	case <-relGate.entered:
	default:
		t.Fatal("the release to master 2 was not sent")
	}
	require.Equal(t, []bool{false, false, true}, heldOn(t, ctx, servers, name))

	m := clients[0].Mutex(name)
	require.NoError(t, m.Lock(ctx))

	lost.armed.Store(true)
	undoGate.armed.Store(true)
	go func() {
		<-undoGate.entered // the first round failed; its undo on master 1 is held
		close(relGate.proceed)
		time.Sleep(300 * time.Millisecond)
		close(undoGate.proceed)
	}()
	start := time.Now()
	ok, err := r.TryLock(ctx)
	t.Logf("TryLock: %v, %v after %v", ok, err, time.Since(start))
	require.False(t, lost.armed.Load(), "the attempt on master 1 was not sent")
	require.NoError(t, err)
	require.True(t, ok, "refused by its own grant of its first round on master 1")
	require.NoError(t, r.Unlock(ctx))
	require.NoError(t, m.Unlock(ctx))
}

// TestRedlockTryLockRetryNotHeldUpByFrozenMaster: of 3 masters, master 2
// is frozen, and another owner holds master 0 (a Mutex). The handle's
// TryLock fails (only master 1 grants it); its undo on master 1 is held
// back, still on its way when TryLock returns (recorded for the next call).
// The other owner then releases master 0. The handle's next TryLock sends
// its first round: master 0 grants it, master 1 refuses it (the handle's own
// grant of the last call, whose undo lands right after), and master 2 does
// not answer within the attempt timeout (1s). The retry must go: masters 0
// and 1 are free, a quorum. It did not: the call waited for every release
// of the handle on its way, also the undos on the frozen master, which
// cannot be done within the attempt timeout (the first round alone took
// it), and TryLock failed with ErrNotObtained, "1 of 3 masters granted the
// lock", refused by its own grant on master 1.
func TestRedlockTryLockRetryNotHeldUpByFrozenMaster(t *testing.T) {
	rig := newRedlockRig(t, 25*time.Second)
	ctx, servers, name := rig.ctx, rig.servers, rig.name
	// Master 1: the next release once armed (the undo of the first
	// TryLock's round) is held back until the attempt after it, once armed,
	// has been answered.
	undoGate := &gateScriptHook{match: rig.isRelease, entered: make(chan struct{}), proceed: make(chan struct{})}
	nextAttempt := new(atomic.Bool)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(undoGate.proceed) }) })
	clients := rig.clients(t, nil, []redis.Hook{undoGate, cancelAfterHook{match: armedOnce(nextAttempt, rig.isAttempt), cancel: func() {
		once.Do(func() { close(undoGate.proceed) })
	}}}, nil)

	r := redlatch.NewRedlock(name, clients)
	m := clients[0].Mutex(name)
	require.NoError(t, m.Lock(ctx))
	servers[2].Stop(t)
	var thawOnce sync.Once
	thaw := func() { thawOnce.Do(func() { servers[2].Cont(t) }) }
	t.Cleanup(thaw)

	undoGate.armed.Store(true)
	ok, err := r.TryLock(ctx)
	t.Logf("first TryLock: %v, %v", ok, err)
	require.False(t, ok)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)
	select {
	case <-undoGate.entered:
	default:
		t.Fatal("the undo on master 1 was not sent")
	}
	require.NoError(t, m.Unlock(ctx))

	nextAttempt.Store(true)
	start := time.Now()
	ok, err = r.TryLock(ctx)
	t.Logf("second TryLock: %v, %v after %v", ok, err, time.Since(start))
	require.False(t, nextAttempt.Load(), "the attempt on master 1 was not sent")
	require.NoError(t, err, "refused by its own grant of the first TryLock on master 1")
	require.True(t, ok)
	require.NoError(t, r.Unlock(ctx), "2 of 3 masters released it")
	thaw()
}

// redlockRig is 3 masters for a Redlock of name, and the matchers of its
// attempts and of its releases (and undos) there.
type redlockRig struct {
	ctx                  context.Context
	servers              []*redistest.Server
	name                 string
	isAttempt, isRelease func(redis.Cmder) bool
}

func newRedlockRig(t *testing.T, timeout time.Duration) *redlockRig {
	t.Helper()
	rig := &redlockRig{servers: redlockServers(t, 3), ctx: ctxT(t, timeout), name: redistest.UniqueName(t)}
	wake := "{" + rig.name + "}:wake"
	rig.isAttempt = func(cmd redis.Cmder) bool { return scriptOn(rig.name)(cmd) && !scriptWith(wake)(cmd) }
	rig.isRelease = scriptWith(wake)
	return rig
}

// clients returns a Client per master, hooks[i] added to master i's Redis
// client, with the scripts loaded by a Redlock of another name.
func (rig *redlockRig) clients(t *testing.T, hooks ...[]redis.Hook) []*redlatch.Client {
	t.Helper()
	clients := make([]*redlatch.Client, len(rig.servers))
	for i, s := range rig.servers {
		rdb := s.Client(t)
		if i < len(hooks) {
			for _, h := range hooks[i] {
				rdb.AddHook(h)
			}
		}
		clients[i] = newClientOn(t, rdb)
	}
	warm := redlatch.NewRedlock(rig.name+"-warm", clients)
	require.NoError(t, warm.Lock(rig.ctx))
	require.NoError(t, warm.Unlock(rig.ctx))
	return clients
}

// TestRedlockTryLockAfterUnlockResendsRelease: a Redlock's Unlock releases
// masters 0 and 1; its release to master 2 fails unsent (a network error
// go-redis's retries did not cure), so it is sent again in the background
// (resendRelease), and that resend is slow. Unlock returns nil (a quorum
// released it) with every master answered, so it records nothing for the
// handle's next call. Another owner then takes master 0. The handle's next
// TryLock must not be refused by the handle's own last hold on master 2,
// whose resent release is still on its way: it reported (false, nil),
// "other owners hold it", while only master 0 is taken by another owner.
// The same with an Unlock whose ctx ends while that release is held back
// (its resend is not recorded either), which a seeded stress found.
func TestRedlockTryLockAfterUnlockResendsRelease(t *testing.T) {
	rig := newRedlockRig(t, 20*time.Second)
	ctx, servers, name := rig.ctx, rig.servers, rig.name
	// Master 2: the next release once armed (Unlock's) fails unsent; the
	// one after (its resend) is held until the handle's next attempt there
	// has been answered.
	refuse := &refuseHook{match: rig.isRelease, nth: 1}
	resendGate := &gateScriptHook{match: rig.isRelease, entered: make(chan struct{}), proceed: make(chan struct{})}
	nextAttempt := new(atomic.Bool)
	var once sync.Once
	proceed := func() { once.Do(func() { close(resendGate.proceed) }) }
	t.Cleanup(proceed)
	clients := rig.clients(t, nil, nil, []redis.Hook{
		refuse,
		resendGate,
		cancelAfterHook{match: armedOnce(nextAttempt, rig.isAttempt), cancel: proceed},
	})

	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	refuse.armed.Store(true)
	resendGate.armed.Store(true)
	err := r.Unlock(ctx)
	t.Logf("Unlock: %v", err)
	require.NoError(t, err, "2 of 3 masters released it")
	select {
	case <-resendGate.entered:
	case <-time.After(2 * time.Second):
		t.Fatal("the release to master 2 was not sent again")
	}
	require.Equal(t, []bool{false, false, true}, heldOn(t, ctx, servers, name), "the resent release to master 2 is on its way")

	m := clients[0].Mutex(name)
	require.NoError(t, m.Lock(ctx))
	nextAttempt.Store(true)
	requireRetakesOwnRound(t, ctx, r, m, "refused by its own last hold on master 2, whose resent release was on its way")
	require.False(t, nextAttempt.Load(), "the attempt on master 2 was not sent")
}

// TestRedlockTryLockRetryRefusedByItsOwnSlowUndo: another owner holds
// master 1 (a Mutex). The handle's TryLock gets master 0; master 2 grants
// it too but the reply is lost (the outcome unknown): the round fails with
// ErrNotObtained and is undone, the undo on master 2 slow, still on its way
// when TryLock returns (recorded for the next call). The handle's next
// TryLock is refused on master 1 (the other owner) and on master 2 (its own
// grant of the last call); it waits the attempt timeout for that undo and
// tries again, once, still refused there. It reported (false, nil), "other
// owners hold it", while only master 1 was taken by another owner: a hold
// of the handle's own owner id (a non-shared handle holds nothing while it
// acquires) is not another owner's. (Reduced from a seeded stress.)
func TestRedlockTryLockRetryRefusedByItsOwnSlowUndo(t *testing.T) {
	rig := newRedlockRig(t, 20*time.Second)
	ctx, servers, name := rig.ctx, rig.servers, rig.name
	clients, lost, undoGate, proceed := rig.lostAttemptSlowUndo(t)

	m := clients[1].Mutex(name)
	require.NoError(t, m.Lock(ctx))
	r := redlatch.NewRedlock(name, clients)

	lost.armed.Store(true)
	undoGate.armed.Store(true)
	ok, err := r.TryLock(ctx)
	t.Logf("first TryLock: %v, %v", ok, err)
	require.False(t, lost.armed.Load(), "the attempt on master 2 was not sent")
	require.False(t, ok)
	require.ErrorIs(t, err, redlatch.ErrNotObtained, "only master 0 granted it")
	select {
	case <-undoGate.entered:
	case <-time.After(2 * time.Second):
		t.Fatal("the undo on master 2 was not sent")
	}
	require.Equal(t, []bool{false, true, true}, heldOn(t, ctx, servers, name), "the undo on master 2 is on its way")

	start := time.Now()
	ok, err = r.TryLock(ctx)
	t.Logf("second TryLock: %v, %v after %v", ok, err, time.Since(start))
	proceed()
	require.False(t, !ok && err == nil, "(false, nil) while only master 1 is held by another owner: refused by its own grant on master 2")
	if ok {
		require.NoError(t, r.Unlock(ctx))
	} else {
		require.ErrorIs(t, err, redlatch.ErrNotObtained)
	}
	require.NoError(t, m.Unlock(ctx))
	require.Eventually(t, func() bool {
		return heldOn(t, ctx, servers, name)[2] == false
	}, 3*time.Second, 20*time.Millisecond, "the undo on master 2 landed")
}

// TestRedlockTryLockContendedNoRetryWait: other owners hold masters 0 and 1
// of 3, and the handle's undo of its last round on master 2 is on its way
// (held back). TryLock's round is refused on every master: by other owners
// on two, a majority, and by the handle's own grant on master 2. It waited
// up to the attempt timeout (1s) for that undo and tried again, although
// no undo could make a quorum possible: (false, nil) comes at once.
func TestRedlockTryLockContendedNoRetryWait(t *testing.T) {
	rig := newRedlockRig(t, 20*time.Second)
	ctx, name := rig.ctx, rig.name
	clients, lost, undoGate, proceed := rig.lostAttemptSlowUndo(t)
	for _, c := range clients[:2] {
		m := c.Mutex(name)
		require.NoError(t, m.Lock(ctx))
		t.Cleanup(func() { _ = m.Unlock(context.Background()) })
	}
	r := redlatch.NewRedlock(name, clients)

	lost.armed.Store(true)
	undoGate.armed.Store(true)
	ok, err := r.TryLock(ctx)
	require.NoError(t, err)
	require.False(t, ok, "other owners hold masters 0 and 1")
	require.False(t, lost.armed.Load(), "the attempt on master 2 was not sent")
	select {
	case <-undoGate.entered:
	case <-time.After(2 * time.Second):
		t.Fatal("the undo on master 2 was not sent")
	}

	start := time.Now()
	ok, err = r.TryLock(ctx)
	took := time.Since(start)
	proceed()
	require.NoError(t, err)
	require.False(t, ok, "other owners hold masters 0 and 1")
	require.Less(t, took, 500*time.Millisecond, "TryLock waited for its own undo on master 2")
}

// lostAttemptSlowUndo returns the rig's Clients with faults on master 2,
// each armed by the test: the first attempt runs but its reply is lost, and
// the next release (the undo of that round) is held back until proceed
// (called at cleanup at the latest).
func (rig *redlockRig) lostAttemptSlowUndo(t *testing.T) (clients []*redlatch.Client, lost *lossyHook,
	undoGate *gateScriptHook, proceed func()) {
	t.Helper()
	lost = &lossyHook{match: rig.isAttempt}
	undoGate = &gateScriptHook{match: rig.isRelease, entered: make(chan struct{}), proceed: make(chan struct{})}
	var once sync.Once
	proceed = func() { once.Do(func() { close(undoGate.proceed) }) }
	t.Cleanup(proceed)
	return rig.clients(t, nil, nil, []redis.Hook{lost, undoGate}), lost, undoGate, proceed
}

// and 2; master 1 grants the Redlock's round, and the undo of that grant
// is slow on its way there (1.5s: a slow link, a master paused just after
// it answered). Lock's ctx (200ms) ends while the failed round is being
// undone: Lock must return then, the undo going on in the background (the
// handle counts it in flight, and Close waits for it), as a Mutex's Lock
// does and as the masters that did not answer the round are undone. It
// waited for the undo up to the attempt timeout (1s at the default lease)
// past its ctx. (Found by a reviewer.)
func TestRedlockLockReturnsByCtxWithSlowUndo(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	others := redlockClients(t, servers)
	for _, i := range []int{0, 2} {
		require.NoError(t, others[i].Mutex(name, redlatch.WithLease(20*time.Second)).Lock(ctx))
	}
	armed := new(atomic.Bool)
	clients := make([]*redlatch.Client, len(servers))
	for i, s := range servers {
		rdb := s.Client(t)
		if i == 1 {
			slow := scriptWith("{" + name + "}:wake") // an unlock script: the round's undo
			rdb.AddHook(delayHook{match: func(cmd redis.Cmder) bool { return armed.Load() && slow(cmd) },
				d: 1500 * time.Millisecond})
		}
		clients[i] = newClientOn(t, rdb)
	}
	// Load the scripts on master 1: a NOSCRIPT resend is not delayed twice.
	warm := clients[1].Mutex(name + "-warm")
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))
	r := redlatch.NewRedlock(name, clients)
	armed.Store(true)

	took, err := callTimed(ctx, 200*time.Millisecond, r.Lock)
	t.Logf("Lock: %v after %v", err, took)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Less(t, took, 800*time.Millisecond, "Lock returned long after its ctx, waiting for a slow undo")

	// The undo still lands: master 1 is free again, not held by nobody.
	require.Eventually(t, func() bool { return !heldOn(t, ctx, servers, name)[1] },
		5*time.Second, 20*time.Millisecond, "the round's grant on master 1 was never undone")
}

// TestRedlockCloseWaitsForUndoAfterCtx: a Redlock's Lock is on its way
// when the Client of master 1 is closed, and its ctx ends while its round
// (granted by master 1, refused by master 2, unanswered by master 0) is
// undone. Since 7536249 the round's release returns at once when ctx has
// ended, leaving the undos to the background, "waited for by Close"; but
// an undo registers with enterWait, which fails once Close has begun: Close
// returned as soon as Lock did, with master 1's undo still on its way. The
// caller then closes its Redis client (as documented, after Close), the
// undo fails, and master 1 stays locked by nobody for the whole lease.
// (Found by a reviewer of 7536249.)
func TestRedlockCloseWaitsForUndoAfterCtx(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	others := redlockClients(t, servers)
	require.NoError(t, others[2].Mutex(name, redlatch.WithLease(20*time.Second)).Lock(ctx))

	armed := new(atomic.Bool)
	wake := scriptWith("{" + name + "}:wake") // an unlock script (an undo)
	isLock := func(cmd redis.Cmder) bool { return scriptWith(lockKey(name))(cmd) && !wake(cmd) }
	hold := delayHook{match: func(cmd redis.Cmder) bool { return armed.Load() && isLock(cmd) },
		once: new(sync.Once), entered: make(chan struct{})} // until its ctx ends
	undoGate := &gateScriptHook{match: wake, entered: make(chan struct{}), proceed: make(chan struct{})}
	var once sync.Once
	openGate := func() { once.Do(func() { close(undoGate.proceed) }) }
	t.Cleanup(openGate)
	clients := make([]*redlatch.Client, len(servers))
	rdbs := make([]*redis.Client, len(servers))
	for i, s := range servers {
		rdbs[i] = s.Client(t)
		switch i {
		case 0:
			rdbs[i].AddHook(hold)
		case 1:
			rdbs[i].AddHook(undoGate)
		}
		clients[i] = newClientOn(t, rdbs[i])
		warm := clients[i].Mutex(name + "-warm") // loads the scripts
		require.NoError(t, warm.Lock(ctx))
		require.NoError(t, warm.Unlock(ctx))
	}
	r := redlatch.NewRedlock(name, clients)
	armed.Store(true)
	undoGate.armed.Store(true)

	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lockErr := make(chan error, 1)
	go func() { lockErr <- r.Lock(lctx) }()
	<-hold.entered // the round is on its way: master 0 does not answer
	require.Eventually(t, func() bool { return heldOn(t, ctx, servers, name)[1] },
		2*time.Second, time.Millisecond, "master 1 did not grant the round")

	closed := make(chan error, 1)
	go func() { closed <- clients[1].Close() }()
	require.Eventually(t, func() bool {
		_, err := clients[1].Mutex(name + "-probe").TryLock(ctx)
		return errors.Is(err, redlatch.ErrClosed)
	}, 2*time.Second, time.Millisecond, "Close did not begin")
	cancel() // Lock's ctx ends while its round is on its way

	require.ErrorIs(t, <-lockErr, redlatch.ErrNotObtained)
	<-undoGate.entered // master 1's undo is on its way
	// Let the undo through in a while, unless Close returned first.
	time.AfterFunc(500*time.Millisecond, openGate)
	require.NoError(t, <-closed)
	undone := !heldOn(t, ctx, servers, name)[1]
	// The Redis client is closed after Close, as documented: an undo
	// still on its way fails, and master 1 stays locked by nobody.
	require.NoError(t, rdbs[1].Close())
	openGate()
	require.True(t, undone, "Close returned before the undo of the Redlock's round on master 1 landed")
}

// callTimed calls f with a context of ctx that ends after d, and returns
// how long the call took and its error.
func callTimed(ctx context.Context, d time.Duration, f func(context.Context) error) (time.Duration, error) {
	fctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	start := time.Now()
	err := f(fctx)
	return time.Since(start), err
}

// TestRedlockUnlockAfterCloseResent: a held Redlock is released on every
// master by Unlock even once one of its Clients is closed (Close leaves the
// Redis client open; TestRedlockUnlockWithAClientClosed). When that
// master's release fails with no reply (it may never have reached Redis),
// it is resent in the background, as every release is. It was not: the
// resend registers with enterResend, which refuses once Close has begun
// and no call is registered, and the resend was dropped: master 0 stayed
// locked by nobody for the hold's whole lease.
// (Found by a reviewer of 37a3466.)
func TestRedlockUnlockAfterCloseResent(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	rdb0 := servers[0].Client(t)
	fail := &refuseHook{match: scriptWith("{" + name + "}:wake"), nth: 1} // the release, unsent
	rdb0.AddHook(fail)
	clients := []*redlatch.Client{newClientOn(t, rdb0)}
	clients = append(clients, redlockClients(t, servers[1:])...)
	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, servers, name))

	require.NoError(t, clients[0].Close()) // nothing in flight: returns at once
	fail.armed.Store(true)
	err := r.Unlock(ctx)
	t.Logf("Unlock: %v", err)
	require.GreaterOrEqual(t, fail.seen.Load(), int32(1), "the release to master 0 was not sent")
	require.Eventually(t, func() bool { return !heldOn(t, ctx, servers, name)[0] },
		3*time.Second, 20*time.Millisecond,
		"master 0's failed release was not resent: it stays locked by nobody for the lease")
}

// TestRedlockNotReplicatedWithFrozenMasterAfterCtx: of three masters, two
// grant the lock but have no replica to acknowledge it (WithReplicaSync:
// ErrNotReplicated, released again) and the third is frozen (SIGSTOP).
// Too many masters' replication is broken for a quorum, so Lock fails; its
// ctx ends while the frozen master's attempt is still unanswered. The
// error must match ErrNotObtained and ctx.Err(), and still carry the
// masters' errors: ErrNotReplicated (what tells broken replication from a
// busy lock, see the README's WithReplicaSync example). It did not:
// newWaitError dropped the whole joined error of the round because one
// member, the frozen master's, is a context error, so the caller saw
// "context deadline exceeded" alone, as for a lock merely held by others.
// (Found by a reviewer.)
func TestRedlockNotReplicatedWithFrozenMasterAfterCtx(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	// Load the scripts on every master first.
	warm := redlatch.NewRedlock(redistest.UniqueName(t)+"-warm", redlockClients(t, servers))
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))

	plain := redlockClients(t, servers[:1])
	synced := redlockClients(t, servers[1:], redlatch.WithReplicaSync(1, 20*time.Millisecond))
	clients := []*redlatch.Client{plain[0], synced[0], synced[1]}
	name := redistest.UniqueName(t)
	// A 20s lease: master 0's attempt timeout is 1s, past Lock's ctx.
	r := redlatch.NewRedlock(name, clients, redlatch.WithLease(20*time.Second))

	servers[0].Stop(t)
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			servers[0].Cont(t)
		}
	}
	t.Cleanup(thaw)

	lctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	err := r.Lock(lctx)
	t.Logf("Lock: %v", err)
	thaw()
	require.Error(t, lctx.Err(), "the ctx had not ended")
	requireWaitErr(t, err, lctx)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated, "the masters' errors were dropped")
	require.Contains(t, err.Error(), "redlock master 1", "the masters' errors were dropped")

	// Nothing is left held once the frozen master has taken its undo.
	require.Eventually(t, func() bool {
		h := heldOn(t, ctx, servers, name)
		return !h[0] && !h[1] && !h[2]
	}, 5*time.Second, 20*time.Millisecond, "a master was left locked by nobody")
}
