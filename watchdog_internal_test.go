package redlatch

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestRenewSortedSetHold: the watchdog renews sorted-set entries (the kind
// that permits, read holds and queue places use) by moving their expiry score
// and keeping the key's TTL, and reports the hold lost once the entry is gone.
func TestRenewSortedSetHold(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := context.Background()
		rdb := b.Client(t)
		c := New(rdb, WithWatchdogTimeout(300*time.Millisecond))
		t.Cleanup(func() { _ = c.Close() })
		key := "{" + redistest.UniqueName(t) + "}:permits"
		// Scored as a permit record is: its expiry, server ms (one already
		// past is gone, and not renewed).
		require.NoError(t, rdb.ZAdd(ctx, key, redisZ(float64(time.Now().UnixMilli()+300), "holder-1")).Err())
		require.NoError(t, rdb.PExpire(ctx, key, 300*time.Millisecond).Err())
		h := c.wd.add("permits", key, 'z', "holder-1", 300*time.Millisecond, true, time.Now())

		time.Sleep(700 * time.Millisecond) // two leases: only renewal keeps it
		score, err := rdb.ZScore(ctx, key, "holder-1").Result()
		require.NoError(t, err)
		require.Greater(t, score, float64(time.Now().UnixMilli()), "expiry score not moved ahead")
		ttl, err := rdb.PTTL(ctx, key).Result()
		require.NoError(t, err)
		require.Positive(t, ttl)
		require.False(t, h.isLost())

		require.NoError(t, rdb.ZRem(ctx, key, "holder-1").Err())
		select {
		case <-h.lostChan():
		case <-time.After(time.Second):
			t.Fatal("a vanished entry was not reported lost")
		}
		c.wd.remove(h)
	})
}

func redisZ(score float64, member string) redis.Z { return redis.Z{Score: score, Member: member} }

// TestHoldLostOnArrival: a hold whose acquisition reply came after its lease
// ran out (a slow link, a paused client) is lost the moment it is tracked,
// before the caller can look at Lost, not at the next tick of a timer.
func TestHoldLostOnArrival(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	c := New(rdb, WithWatchdogTimeout(time.Second))
	t.Cleanup(func() { _ = c.Close(); _ = rdb.Close() })
	h := c.wd.add("late", "{late}:lock", 'h', "owner", 500*time.Millisecond, true, time.Now().Add(-800*time.Millisecond))
	require.True(t, h.isLost(), "a hold past its lease on arrival is not lost at once")
	require.True(t, c.wd.remove(h))
}

// TestSyncedRenewalPerMaster: under WithReplicaSync on a cluster, renewals
// are grouped per master (one pipeline and one WAIT each). With no replica
// to acknowledge, every master still runs its renewals (the keys' TTLs move)
// but no hold's local deadline moves, so each hold is lost at its deadline.
func TestSyncedRenewalPerMaster(t *testing.T) {
	var cluster *redistest.Backend
	for _, b := range redistest.Backends(t) {
		if b.Cluster != nil {
			cluster = &b
		}
	}
	if cluster == nil {
		t.Skip("no redis-server: no local cluster")
	}
	ctx := context.Background()
	rdb := cluster.Client(t)
	c := New(rdb, WithReplicaSync(1, 20*time.Millisecond), WithWatchdogTimeout(900*time.Millisecond))
	t.Cleanup(func() { _ = c.Close() })
	base := redistest.UniqueName(t)
	masters := map[int]bool{}
	var holds []*hold
	var keys []string
	for i := 0; len(masters) < 3 || len(keys) < 12; i++ {
		key := "{" + base + "-" + string(rune('a'+i%26)) + string(rune('a'+i/26)) + "}:lock"
		masters[redistest.KeySlot(key)*3/16384] = true
		require.NoError(t, rdb.HSet(ctx, key, "o", "owner").Err())
		require.NoError(t, rdb.PExpire(ctx, key, 900*time.Millisecond).Err())
		keys = append(keys, key)
		holds = append(holds, c.wd.add("synced", key, 'h', "owner", 900*time.Millisecond, true, time.Now()))
	}
	time.Sleep(500 * time.Millisecond) // past the first renewal (every 300ms)
	for _, key := range keys {
		ttl, err := rdb.PTTL(ctx, key).Result()
		require.NoError(t, err)
		require.Greater(t, ttl, 500*time.Millisecond, "renewal did not run on the master of %s", key)
	}
	for _, h := range holds {
		select {
		case <-h.lostChan():
		case <-time.After(3 * time.Second):
			t.Fatal("a hold whose renewals no replica acknowledged was not lost at its deadline")
		}
		c.wd.remove(h)
	}
}

// TestSupersedeDuringPartialUnlockClosesLost: goroutines 1 and 2 share a
// ReentrantMutex handle, each holding it once; an operator force-unlocks
// it. Goroutine 2's Unlock is on its way (it can end only one of the two
// holds) when goroutine 3's Lock takes the now free lock anew: the handle
// tracks the new hold and stops tracking the old one. The old one ended
// before goroutine 1's Unlock, so goroutine 1's Lost must close. Before the
// fix, supersede took any release in flight for the one that ended the
// hold, and dropped it silently: Lost never closed. (Found by a reviewer.)
func TestSupersedeDuringPartialUnlockClosesLost(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, rdb := plainClient(t, b)
		name := redistest.UniqueName(t)
		m := c.ReentrantMutex(name)
		gate := newOwnerGate(unlockScript, m.e.owner, false)
		rdb.AddHook(gate)
		require.NoError(t, m.Lock(ctx)) // loads the scripts
		require.NoError(t, m.Unlock(ctx))

		require.NoError(t, m.Lock(ctx)) // goroutine 1
		lost := m.Lost()
		require.NoError(t, m.Lock(ctx)) // goroutine 2
		ok, err := c.Mutex(name).ForceUnlock(ctx)
		require.NoError(t, err)
		require.True(t, ok)

		gate.arm()
		g2 := make(chan error, 1)
		go func() { g2 <- m.Unlock(ctx) }() // goroutine 2, held before it is sent
		<-gate.held
		require.NoError(t, m.Lock(ctx)) // goroutine 3: a new hold
		select {
		case <-lost:
		case <-time.After(time.Second):
			t.Error("the hold goroutine 1 holds ended, and its Lost is open")
		}
		close(gate.proceed)
		require.ErrorIs(t, <-g2, ErrNotHeld)
	})
}

// TestReentrantUnlockFindingHoldGoneClosesLost: goroutines 1 and 2 share a
// handle of a reentrant kind, each holding it once. The hold is lost (an
// operator's ForceUnlock), and goroutine 1 unlocks before the watchdog's
// next renewal: ErrNotHeld, the hold is gone.
//   - Goroutine 2 still counts a hold on the handle and watches Lost (as Do
//     does): Lost must close. The Unlock stopped tracking the hold without a
//     loss, so Lost never closed and Do's function ran on unprotected.
//     (Found by a reviewer on ReentrantMutex; FairMutex.Unlock,
//     RWMutex.Unlock and RWMutex.RUnlock had the same gap.)
//   - Goroutine 3 then takes the lock anew through the same handle, and
//     only then does goroutine 2 make the Unlock that pairs with its own
//     (lost) Lock. That Unlock must not release goroutine 3's hold, whose
//     Lost is open. The handle had forgotten goroutine 2's hold and counted
//     its Unlock against the new one: it released it (nil), another owner
//     took the lock while goroutine 3 held it, and goroutine 3 was never
//     told. (Found by a randomized RWMutex stress: two goroutines' read
//     holds on one handle lost to ForceUnlock.)
func TestReentrantUnlockFindingHoldGoneClosesLost(t *testing.T) {
	for ki, k := range reentrantKinds {
		t.Run(k.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				// Renewals every 10s: the watchdog does not notice the loss.
				ctx, c, _ := plainClient(t, b)
				name := redistest.UniqueName(t)
				m := k.make(c, name)
				require.NoError(t, m.lock(ctx)) // goroutine 1
				require.NoError(t, m.lock(ctx)) // goroutine 2
				lost := m.lost()
				ok, err := k.make(c, name).force(ctx) // an operator
				require.NoError(t, err)
				require.True(t, ok)

				require.ErrorIs(t, m.unlock(ctx), ErrNotHeld) // goroutine 1
				select {
				case <-lost:
				case <-time.After(time.Second):
					t.Fatal("goroutine 2's hold is gone, and its Lost is open")
				}

				require.NoError(t, m.lock(ctx)) // goroutine 3: a new hold
				lost3 := m.lost()
				err2 := m.unlock(ctx) // goroutine 2: pairs with its lost hold

				select {
				case <-lost3:
					t.Fatal("goroutine 3's hold was reported lost: it was never lost")
				default:
				}
				requireExcluded(t, ctx, b, ki, name, "another owner got in while goroutine 3 holds the lock")
				require.ErrorIs(t, err2, ErrNotHeld, "goroutine 2's Unlock pairs with a lost hold")
				require.NoError(t, m.unlock(ctx))              // goroutine 3
				excluded, err := k.make(c, name).excluded(ctx) // another owner
				require.NoError(t, err)
				require.False(t, excluded, "a hold was left behind")
			})
		})
	}
}

// TestSyncedRenewalAfterNoScriptWaitsOnce: README (WithReplicaSync, Cost):
// a renewal waits for its replicas up to the timeout. With WAIT pipelined
// behind the renewal scripts, a renewal whose scripts the server refused
// (NOSCRIPT: a restart, SCRIPT FLUSH) waited once behind the refused
// scripts and once more behind the resent ones: twice the timeout when a
// replica is slow or gone (the acquisitions' runOnWithWait gives the second
// WAIT what is left of the timeout). Here no replica is connected: every
// WAIT blocks for its whole timeout. (Found by a reread.)
func TestSyncedRenewalAfterNoScriptWaitsOnce(t *testing.T) {
	srv := redistest.NewServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rdb := redis.NewClient(srv.Options()) // ReadTimeout 2s: a 1s WAIT is pipelined
	t.Cleanup(func() { _ = rdb.Close() })
	timeout := time.Second // (Redis ends a WAIT up to 100ms late: hz 10)
	c := New(rdb, WithReplicaSync(1, timeout))
	t.Cleanup(func() { _ = c.Close() })
	key := "{synced-noscript}:lock"
	require.NoError(t, rdb.HSet(ctx, key, "o", "me", "c", 1, "t", 1).Err())
	require.NoError(t, rdb.PExpire(ctx, key, time.Minute).Err())
	h := &hold{name: "synced-noscript", key: key, kind: 'h', member: "me", lease: 30 * time.Second, renew: true}
	require.Equal(t, [][]int64{{-1}}, c.wd.runBatchesSynced(ctx, [][]*hold{{h}}), "renewed, not replicated")

	require.NoError(t, rdb.ScriptFlush(ctx).Err())
	start := time.Now()
	out := c.wd.runBatchesSynced(ctx, [][]*hold{{h}})
	took := time.Since(start)
	require.Equal(t, [][]int64{{-1}}, out, "renewed after loading the script, not replicated")
	require.Less(t, took, timeout*3/2, "the renewal waited for its replicas more than the timeout")
}

// TestRenewalPipelineOnFrozenClusterMaster: on a *redis.ClusterClient with
// ContextTimeoutEnabled off, the renewals of two holds on one master, in
// two slots, go in one pipeline, which the master's clone sends. When the
// master does not answer, the clone's read ends at ctx's deadline (an i/o
// timeout, which go-redis returns before ctx's own timer has cancelled
// ctx): the renewal must return then, not be sent again on the cluster
// client's own path, which waits for the ReadTimeout.
func TestRenewalPipelineOnFrozenClusterMaster(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	c := New(cl.DefaultOptionsClient(t), WithWatchdogTimeout(time.Minute))
	t.Cleanup(func() { _ = c.Close() })

	// Two keys on master 1, in two slots: two batches of one pipeline.
	var batches [][]*hold
	for n := 0; len(batches) < 2; n++ {
		key := "{" + redistest.UniqueName(t) + "-" + strconv.Itoa(n) + "}:lock"
		if cl.ServerFor(key) != cl.Servers[1] ||
			len(batches) == 1 && redistest.KeySlot(key) == redistest.KeySlot(batches[0][0].key) {
			continue
		}
		batches = append(batches, []*hold{{key: key, kind: 'h', member: "owner", lease: time.Minute}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c.wd.runBatches(ctx, batches) // the scripts cached, the nodes known

	cl.Servers[1].Stop(t)
	t.Cleanup(func() { cl.Servers[1].Cont(t) })
	// Several times: the read's end does not always come before ctx's
	// timer. Before the cluster marks the master failed (its node timeout
	// is 2s), mostly.
	for range 8 {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		start := time.Now()
		c.wd.runBatches(ctx, batches)
		took := time.Since(start)
		cancel()
		require.Less(t, took, time.Second, "a renewal pipeline to a frozen master outlasted its ctx")
	}
}

// renewGate is a go-redis hook on the watchdog's renewals: once armed, it
// holds the reply of the next renewal (which ran in Redis) until released;
// once failing, it fails every renewal without sending it (Redis
// unreachable).
type renewGate struct {
	mu      sync.Mutex
	armed   bool
	failing bool
	replied chan struct{}
	release chan struct{}
}

func isRenewal(cmd redis.Cmder) bool {
	args := cmd.Args()
	if len(args) < 2 {
		return false
	}
	s, _ := args[1].(string)
	return s == renewScript.Hash() || s == renewLua
}

func (g *renewGate) DialHook(next redis.DialHook) redis.DialHook { return next }

func (g *renewGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (g *renewGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !isRenewal(cmd) {
			return next(ctx, cmd)
		}
		g.mu.Lock()
		armed, failing := g.armed, g.failing
		g.armed = false
		g.mu.Unlock()
		if failing {
			err := errors.New("renewal not sent: Redis unreachable")
			cmd.SetErr(err)
			return err
		}
		err := next(ctx, cmd)
		if armed {
			close(g.replied)
			<-g.release
		}
		return err
	}
}

// TestRenewalReplyAfterReentryKeepsItsLease: a renewal whose reply is
// applied after a re-entry of the hold (sent after the renewal, and which
// restarted the lease in Redis) must not move the hold's local deadline
// back to the renewal's send time plus the lease: Lost would then close,
// when Redis stops answering, while Redis still holds the lock for the
// re-entry's lease (the Unlock then reports ErrNotHeld). (Found by a
// reviewer.)
func TestRenewalReplyAfterReentryKeepsItsLease(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	g := &renewGate{replied: make(chan struct{}), release: make(chan struct{})}
	rdb.AddHook(g)
	const lease = 900 * time.Millisecond // renewal period 300ms
	c := New(rdb, WithWatchdogTimeout(lease))
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	require.NoError(t, renewScript.Load(ctx, rdb).Err()) // the gated renewal is the one that runs
	m := c.ReentrantMutex(redistest.UniqueName(t))
	require.NoError(t, m.Lock(ctx))
	m.mu.Lock()
	h := m.h
	m.mu.Unlock()

	g.mu.Lock()
	g.armed = true
	g.mu.Unlock()
	select {
	case <-g.replied: // the next renewal ran in Redis; its reply is held
	case <-ctx.Done():
		t.Fatal("no renewal")
	}
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	require.NoError(t, m.Lock(ctx)) // re-entry: Redis restarts the lease from now
	reentryEnd := start.Add(lease)
	require.False(t, c.wd.deadlineOf(h).Before(reentryEnd), "re-entry did not extend the deadline")

	g.mu.Lock()
	g.failing = true // from now on Redis does not answer renewals
	g.mu.Unlock()
	close(g.release)
	require.Eventually(t, func() bool {
		c.wd.mu.Lock()
		defer c.wd.mu.Unlock()
		return !h.renewing
	}, 5*time.Second, time.Millisecond, "renewal reply not applied")
	require.False(t, c.wd.deadlineOf(h).Before(reentryEnd),
		"the renewal's reply moved the deadline %v before the re-entry's lease end",
		reentryEnd.Sub(c.wd.deadlineOf(h)))

	select {
	case <-m.Lost():
		require.False(t, time.Now().Before(reentryEnd),
			"Lost closed %v before the lease Redis gave the re-entry ran out", reentryEnd.Sub(time.Now()))
	case <-ctx.Done():
		t.Fatal("Lost never closed")
	}
}
