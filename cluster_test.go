package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// blocker is one primitive seen as "hold it, have a second Client wait for
// it, release it".
type blocker struct {
	name string
	// hold takes the primitive through c and returns its release.
	hold func(ctx context.Context, c *redlatch.Client, name string) (release func() error, err error)
	// wait blocks through c until the primitive is free, then lets it go.
	wait func(ctx context.Context, c *redlatch.Client, name string) error
}

var blockers = []blocker{
	{"Mutex",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.Mutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.Mutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"ReentrantMutex",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.ReentrantMutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.ReentrantMutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"FairMutex",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.FairMutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.FairMutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"RWMutex/writer-waits-for-reader",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.RWMutex(n)
			return func() error { return m.RUnlock(ctx) }, m.RLock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.RWMutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"RWMutex/reader-waits-for-writer",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.RWMutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.RWMutex(n)
			if err := m.RLock(ctx); err != nil {
				return err
			}
			return m.RUnlock(ctx)
		}},
	{"Semaphore",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			s := c.Semaphore(n, 2)
			return func() error { return s.Release(ctx, 2) }, s.Acquire(ctx, 2)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			s := c.Semaphore(n, 2)
			if err := s.Acquire(ctx, 1); err != nil {
				return err
			}
			return s.Release(ctx, 1)
		}},
	{"CountDownLatch",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			l := c.CountDownLatch(n)
			ok, err := l.TrySetCount(ctx, 1)
			if err == nil && !ok {
				err = fmt.Errorf("latch %q already counting", n)
			}
			return func() error { return l.CountDown(ctx) }, err
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			return c.CountDownLatch(n).Wait(ctx)
		}},
}

// TestClusterEveryPrimitive runs every primitive through a ClusterClient on
// the local 3-master cluster, on names whose slots live on each master: no
// CROSSSLOT, and a waiter on another Client is woken by (sharded) pub/sub
// within 1s of the release, against a 30s lease.
func TestClusterEveryPrimitive(t *testing.T) {
	b := clusterBackend(t)
	// Names on every master: the masters own consecutive thirds of the slots.
	names := map[int]string{}
	base := redistest.UniqueName(t)
	for i := 0; len(names) < 3; i++ {
		n := fmt.Sprintf("%s-%d", base, i)
		names[redistest.KeySlot("{"+n+"}")*3/16384] = n
	}
	for _, k := range blockers {
		for shard, name := range names {
			t.Run(fmt.Sprintf("%s/master%d", k.name, shard), func(t *testing.T) {
				ctx := ctxT(t, 30*time.Second)
				holder, waiter := newClient(t, b), newClient(t, b)
				release, err := k.hold(ctx, holder, name+"-"+k.name)
				require.NoError(t, err)
				done := make(chan error, 1)
				go func() { done <- k.wait(ctx, waiter, name+"-"+k.name) }()
				select {
				case err := <-done:
					t.Fatalf("the waiter did not wait: %v", err)
				case <-time.After(300 * time.Millisecond):
				}
				released := time.Now()
				require.NoError(t, release())
				select {
				case err := <-done:
					require.NoError(t, err)
					require.Less(t, time.Since(released), time.Second, "wake-up after the release")
				case <-time.After(10 * time.Second):
					t.Fatal("the waiter was not woken")
				}
			})
		}
	}
}

// clusterBackend returns the shared 3-master cluster, or skips the test.
func clusterBackend(t *testing.T) redistest.Backend {
	t.Helper()
	for _, b := range redistest.Backends(t) {
		if b.Cluster != nil {
			return b
		}
	}
	t.Skip("no redis-server: no local cluster")
	return redistest.Backend{}
}

// TestUnresponsiveClusterMasterOnDefaultOptions is
// TestUnresponsiveRedisOnDefaultOptions on a Redis Cluster: a
// *redis.ClusterClient with go-redis's default options (ContextTimeoutEnabled
// off) and a ReadTimeout of 5s, one master frozen (before the cluster marks
// it failed). A Lock whose key is on that master returns by its ctx and its
// undo's bound; Unlock, IsLocked and TTL return by their ctx. Calls on the
// other masters go on meanwhile.
func TestUnresponsiveClusterMasterOnDefaultOptions(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	c := newClientOn(t, cl.DefaultOptionsClient(t))

	name := nameOn(t, cl, 1, "frozen")
	held := c.Mutex(name)
	require.NoError(t, held.Lock(ctxT(t, 5*time.Second)))
	other := c.Mutex(name)
	healthy := c.Mutex(nameOn(t, cl, 0, "healthy"))

	resume := freeze(t, cl.Servers[1])
	// Before the cluster marks the frozen master failed (its node timeout
	// is 2s), after which it refuses every key: it has no replica.
	ctx := ctxT(t, time.Second)
	require.NoError(t, healthy.Lock(ctx), "a master that answers")
	require.NoError(t, healthy.Unlock(ctx))

	failsWithin(t, "Lock", 300*time.Millisecond+2*time.Second+700*time.Millisecond, func(ctx context.Context) error {
		err := other.Lock(ctx)
		require.ErrorIs(t, err, redlatch.ErrNotObtained)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		return err
	})
	failsWithin(t, "IsLocked", time.Second, func(ctx context.Context) error { _, err := held.IsLocked(ctx); return err })
	failsWithin(t, "TTL", time.Second, func(ctx context.Context) error { _, err := held.TTL(ctx); return err })
	failsWithin(t, "Unlock", time.Second, func(ctx context.Context) error { return held.Unlock(ctx) })
	resume()
}

// failsWithin runs call with a ctx of 300ms, which must fail, and within d.
func failsWithin(t *testing.T, what string, d time.Duration, call func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := call(ctx)
	took := time.Since(start)
	require.Error(t, err, what)
	require.Less(t, took, d, "%s outlasted its ctx (%v)", what, err)
}

// TestRenewalAfterSlotMovedOnDefaultOptions: on a *redis.ClusterClient with
// ContextTimeoutEnabled off, redlatch's renewals go to each master's node
// client through a clone with the option on (see
// TestUnresponsiveClusterMasterOnDefaultOptions). When the slot of one of
// the holds renewed in one pipeline moves to another master, its renewal
// sent to the old master is redirected (MOVED): the cluster client follows
// the redirect, as it does for a pipeline not routed, and both holds live
// on. So do an IsLocked and a Lock on a moved slot, redirected too.
func TestRenewalAfterSlotMovedOnDefaultOptions(t *testing.T) {
	cl := redistest.NewCluster(t, 3) // private: the test moves a slot
	ctx := ctxT(t, 30*time.Second)
	timeout := 600 * time.Millisecond
	c := newClientOn(t, cl.DefaultOptionsClient(t), redlatch.WithWatchdogTimeout(timeout))

	// Two holds on master 1, in two slots: two batches of one pipeline.
	staying, moving := nameOn(t, cl, 1, "staying"), nameOn(t, cl, 1, "moving")
	require.NotEqual(t, redistest.KeySlot(lockKey(staying)), redistest.KeySlot(lockKey(moving)))
	var holds []*redlatch.Mutex
	for _, name := range []string{staying, moving} {
		m := c.Mutex(name)
		require.NoError(t, m.Lock(ctx))
		holds = append(holds, m)
	}
	cl.MoveSlot(t, redistest.KeySlot(lockKey(moving)), 2)
	// Past several renewals, the first of them to the old master.
	time.Sleep(3 * timeout)
	for i, on := range []int{1, 2} {
		requireOpen(t, holds[i].Lost(), "hold lost")
		ttl, err := cl.Servers[on].Client(t).PTTL(ctx, lockKey([]string{staying, moving}[i])).Result()
		require.NoError(t, err)
		require.Greater(t, ttl, timeout/2, "hold %d not renewed", i)
	}

	moved := nameOn(t, cl, 1, "moved")
	cl.MoveSlot(t, redistest.KeySlot(lockKey(moved)), 2)
	other := c.Mutex(moved)
	locked, err := other.IsLocked(ctx)
	require.NoError(t, err, "IsLocked on a moved slot: %v", err)
	require.False(t, locked)
	cl.MoveSlot(t, redistest.KeySlot(lockKey(moved)), 0)
	require.NoError(t, other.Lock(ctx), "Lock on a moved slot")
	require.NoError(t, other.Unlock(ctx))
	for _, m := range holds {
		require.NoError(t, m.Unlock(ctx))
	}
}

// TestClusterUserHooksSeeRoutedCalls: on a *redis.ClusterClient with
// ContextTimeoutEnabled off, redlatch routes its calls at the node clients
// (see TestUnresponsiveClusterMasterOnDefaultOptions). The user's hooks on
// the cluster client see every call, added before New or after; so do the
// hooks the user gives each node client (OnNewNode) before New.
func TestClusterUserHooksSeeRoutedCalls(t *testing.T) {
	var cl *redistest.Cluster
	for _, b := range redistest.Backends(t) {
		if b.Cluster != nil {
			cl = b.Cluster
		}
	}
	if cl == nil {
		t.Skip("no cluster")
	}
	cc := cl.DefaultOptionsClient(t)
	before, nodes := &scriptCounter{}, &scriptCounter{}
	cc.AddHook(before)
	cc.OnNewNode(func(n *redis.Client) { n.AddHook(nodes) })
	c := newClientOn(t, cc)
	after := &scriptCounter{}
	cc.AddHook(after)
	ctx := ctxT(t, 10*time.Second)
	for range 20 {
		m := c.Mutex(redistest.UniqueName(t))
		require.NoError(t, m.Lock(ctx))
		require.NoError(t, m.Unlock(ctx))
	}
	// 20 Lock and 20 Unlock, and an EVAL after a first EVALSHA on a master
	// (NOSCRIPT) on each master.
	for name, h := range map[string]*scriptCounter{"cluster, before New": before, "cluster, after New": after, "nodes": nodes} {
		require.GreaterOrEqual(t, h.n.Load(), int64(40), "script calls seen by the hooks of the %s", name)
	}
}

// TestColdClusterClientOnDefaultOptions: a new *redis.ClusterClient with
// ContextTimeoutEnabled off has no slot map yet: the first call of a
// Client on it loads the map from a seed node (CLUSTER SLOTS). When that
// node is frozen, the load is redlatch's call too: a Lock returns by its
// ctx and its undo's bound, an IsLocked by its ctx, not after the
// ReadTimeout.
func TestColdClusterClientOnDefaultOptions(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	cold := func() *redlatch.Client {
		return newClientOn(t, cl.DefaultOptionsClient(t, func(o *redis.ClusterOptions) {
			o.Addrs = []string{cl.Servers[1].Addr} // the seed the first load asks
		}))
	}
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	locker, reader := cold().Mutex(name), cold().Mutex(name)

	resume := freeze(t, cl.Servers[1])
	failsWithin(t, "Lock", 300*time.Millisecond+2*time.Second+700*time.Millisecond, locker.Lock)
	failsWithin(t, "IsLocked", time.Second, func(ctx context.Context) error { _, err := reader.IsLocked(ctx); return err })
	resume()
}

// TestClusterReadFallbackAuthenticates: on a *redis.ClusterClient with
// ContextTimeoutEnabled off, a read of redlatch's (IsLocked: a MULTI of
// reads) that its master's clone finds redirected (MOVED: the slot moved
// since the client loaded its map) goes to the cluster client's own path,
// which follows the redirect. A connection that path opens is set up by
// its node client (HELLO, with the password): that HELLO must go on the
// connection, not be routed to another one, or the call finds the
// connection unauthenticated (NOAUTH).
func TestClusterReadFallbackAuthenticates(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 20*time.Second)
	const pw = "redlatch-pw"
	ids := make([]string, len(cl.Servers))
	for i, s := range cl.Servers {
		admin := s.Client(t) // authenticated already when the password is set
		id, err := admin.Do(ctx, "CLUSTER", "MYID").Text()
		require.NoError(t, err)
		ids[i] = id
		require.NoError(t, admin.ConfigSet(ctx, "requirepass", pw).Err())
		t.Cleanup(func() { _ = admin.ConfigSet(context.Background(), "requirepass", "").Err() })
	}
	c := newClientOn(t, cl.DefaultOptionsClient(t, func(o *redis.ClusterOptions) {
		o.Password = pw
		// Connections idle this long are replaced: each call below opens new ones.
		o.ConnMaxIdleTime = 200 * time.Millisecond
	}))

	warm := c.Mutex(nameOn(t, cl, 1, "warm"))
	require.NoError(t, warm.Lock(ctx))
	require.NoError(t, warm.Unlock(ctx))

	// The slot of an unused name moves from master 1 to master 2 (it has
	// no keys: SETSLOT NODE on every master moves it).
	moved := nameOn(t, cl, 1, redistest.UniqueName(t))
	for _, s := range []int{2, 1, 0} {
		admin := redis.NewClient(&redis.Options{Addr: cl.Servers[s].Addr, Password: pw})
		err := admin.Do(ctx, "CLUSTER", "SETSLOT", redistest.KeySlot(lockKey(moved)), "NODE", ids[2]).Err()
		_ = admin.Close()
		require.NoError(t, err)
	}
	time.Sleep(300 * time.Millisecond) // past ConnMaxIdleTime
	locked, err := c.Mutex(moved).IsLocked(ctx)
	require.NoError(t, err, "IsLocked on a moved slot")
	require.False(t, locked)
}

// TestTryLockWhileSlotMigratesOnDefaultOptions: on a *redis.ClusterClient
// with ContextTimeoutEnabled off, a TryLock whose lock's keys have moved to
// the node importing its slot (the migration not finished) is sent on with
// ASKING to that node, in a pipeline of that node's client that redlatch
// routes. That node has no script cached (SCRIPT FLUSH): the NOSCRIPT reply
// must reach go-redis's Script.Run, which then sends the script itself. A
// routed ASKING pipeline that returned nil for a failed script made the
// cluster client report the call successful, with no reply.
func TestTryLockWhileSlotMigratesOnDefaultOptions(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	holder := newClientOn(t, cl.Client(t))
	require.NoError(t, holder.Mutex(name).Lock(ctx))
	c := newClientOn(t, cl.DefaultOptionsClient(t))
	m := c.Mutex(name)
	ok, err := m.TryLock(ctx) // the slot map loaded
	require.NoError(t, err)
	require.False(t, ok)

	// The lock's keys (its hash and fence key; not its channel, which is
	// no key) move to master 2; the slot does not yet.
	cl.StartMigration(t, 2, lockKey(name), "{"+name+"}:fence")
	require.NoError(t, cl.Servers[2].Client(t).ScriptFlush(ctx).Err())

	ok, err = m.TryLock(ctx)
	require.NoError(t, err, "TryLock while its slot migrates")
	require.False(t, ok, "the lock is held")
}

// TestLockAndUnlockRideOutSlotMigration: while a lock's slot migrates,
// Redis refuses its scripts with TRYAGAIN (they name several keys of the
// slot, one of them missing where they land: see the README), and go-redis
// tries again for about 40 ms only. A Lock of a free lock and an Unlock of
// a held one whose keys have moved wait for the slot to move (here 500 ms
// later), as a Lock waits for a holder, and then succeed: they failed with
// TRYAGAIN.
func TestLockAndUnlockRideOutSlotMigration(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 20*time.Second)
	c := newClientOn(t, cl.Client(t))

	ride := func(what string, name string, keys []string, call func() error) {
		t.Helper()
		cl.StartMigration(t, 2, keys...)
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- call() }()
		time.Sleep(500 * time.Millisecond)
		cl.MoveSlot(t, redistest.KeySlot(lockKey(name)), 2)
		select {
		case err := <-done:
			require.NoError(t, err, "%s while its slot migrated", what)
			require.Greater(t, time.Since(start), 400*time.Millisecond, "%s did not wait for the migration", what)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s still waiting after the slot moved", what)
		}
	}

	free := nameOn(t, cl, 1, redistest.UniqueName(t)+"-free")
	f := c.Mutex(free)
	ride("Lock", free, []string{lockKey(free)}, func() error { return f.Lock(ctx) })
	require.Positive(t, f.Token())
	require.NoError(t, f.Unlock(ctx))

	held := nameOn(t, cl, 1, redistest.UniqueName(t)+"-held")
	h := c.Mutex(held)
	require.NoError(t, h.Lock(ctx))
	ride("Unlock", held, []string{lockKey(held), "{" + held + "}:fence"}, func() error { return h.Unlock(ctx) })
	locked, err := h.IsLocked(ctx)
	require.NoError(t, err)
	require.False(t, locked, "the Unlock released nothing")
}

// TestWarmClusterClientOnDefaultOptions: a *redis.ClusterClient with
// ContextTimeoutEnabled off that the application used before New has its
// node clients already, made before New gave the cluster client its
// OnNewNode hook. The first Lock or Unlock checks the masters' versions
// (see probePublish), which reloads the slot map from a node picked at
// random (CLUSTER SLOTS): that load is redlatch's call too, and returns by
// its ctx, not after the ReadTimeout (here 5s), also when the node it asks
// first is frozen and no call of redlatch went to it yet. (The node is
// picked at random: without the fix, about one round in three failed.)
func TestWarmClusterClientOnDefaultOptions(t *testing.T) {
	cl := redistest.NewCluster(t, 3) // private: the test freezes a master
	for round := range 10 {
		cc := cl.DefaultOptionsClient(t)
		// The user's own command: the cluster client loads its slot map
		// and makes a node client for each master.
		require.NoError(t, cc.Ping(ctxT(t, 5*time.Second)).Err(), "round %d", round)
		c := redlatch.New(cc)
		t.Cleanup(func() { _ = c.Close() })
		m := c.Mutex(nameOn(t, cl, 0, fmt.Sprintf("warm-%d", round)))

		resume := freeze(t, cl.Servers[1])
		for _, call := range []struct {
			what string
			f    func(ctx context.Context) error
		}{{"Lock", m.Lock}, {"Unlock", m.Unlock}} {
			ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
			start := time.Now()
			err := call.f(ctx)
			took := time.Since(start)
			cancel()
			require.Less(t, took, 1500*time.Millisecond, "round %d: %s outlasted its ctx (%v)", round, call.what, err)
		}
		resume()
		_ = c.Close()
		cl.WaitReady(t)
	}
}

// TestRenewalBatchSplitByMigration: on a Redis Cluster the watchdog renews
// the holds of one slot in one script call naming all their keys. While the
// slot migrates (a resharding that moved some of its keys, and is stalled
// or slow), Redis refuses with TRYAGAIN a script that names keys of the
// slot present on both sides, though each key alone is served (the source
// runs it, or answers ASK for a key moved). A Mutex and a Semaphore of one
// name share a slot: once the Mutex's keys moved, the batch renewing both
// was refused at every period, and both valid holds were reported lost at
// their deadline, the lock and permits expiring under their holders.
func TestRenewalBatchSplitByMigration(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 20*time.Second)
	c := newClientOn(t, cl.Client(t), redlatch.WithWatchdogTimeout(600*time.Millisecond))
	holdThroughMigration(t, ctx, cl, c)
}

// holdThroughMigration takes a Mutex and a Semaphore of one name on master
// 1 of cl through c (its watchdog timeout 600ms), moves the lock's keys to
// master 2 (the slot left migrating, the permits' key on master 1), and
// checks, two and a half leases later, that both holds are still in force.
// It returns both, and the name.
func holdThroughMigration(t *testing.T, ctx context.Context, cl *redistest.Cluster, c *redlatch.Client) (*redlatch.Mutex, *redlatch.Semaphore, string) {
	t.Helper()
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	m := c.Mutex(name)
	require.NoError(t, m.Lock(ctx))
	s := c.Semaphore(name, 2)
	require.NoError(t, s.Acquire(ctx, 1))
	cl.StartMigration(t, 2, lockKey(name), "{"+name+"}:fence")
	requireHeldThroughMigration(t, ctx, cl, m, s, "while its slot migrated", lockKey(name), "{"+name+"}:sem")
	return m, s, name
}

// requireHeldThroughMigration waits two and a half leases (600ms each:
// only renewals keep the holds) and checks that m's hold and s's permits
// are in force: Lost open, their keys alive where they are now.
func requireHeldThroughMigration(t *testing.T, ctx context.Context, cl *redistest.Cluster, m *redlatch.Mutex, s *redlatch.Semaphore, when string, keys ...string) {
	t.Helper()
	time.Sleep(1500 * time.Millisecond)
	requireOpen(t, m.Lost(), "the Mutex hold was lost "+when)
	requireOpen(t, s.Lost(), "the Semaphore permits were lost "+when)
	rdb := cl.Client(t) // follows ASK to the master a key moved to
	for _, key := range keys {
		ttl, err := rdb.PTTL(ctx, key).Result()
		require.NoError(t, err)
		require.Positive(t, ttl, "%s expired %s", key, when)
	}
}

// TestRenewalOfMovedSlotOnFreshMaster: on a cluster, a renewal of several
// batches goes per master in one pipeline. While a slot migrates, a batch
// whose keys all moved is answered -ASK by the old master, and go-redis
// sends it to the importing one, which may not have the renewal script (a
// master new to the cluster, restarted, or after SCRIPT FLUSH): NOSCRIPT.
// The script was loaded on the old master (which had it) and the batch sent
// again by its SHA, refused the same way: its holds were not renewed while
// the migration lasted, and were lost (a Mutex whose keys moved; a
// Semaphore of another slot of the same master makes the renewal two
// batches).
func TestRenewalOfMovedSlotOnFreshMaster(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 20*time.Second)
	c := newClientOn(t, cl.Client(t), redlatch.WithWatchdogTimeout(600*time.Millisecond))
	name, other := nameOn(t, cl, 1, redistest.UniqueName(t)), nameOn(t, cl, 1, redistest.UniqueName(t)+"-other")
	m := c.Mutex(name)
	require.NoError(t, m.Lock(ctx))
	s := c.Semaphore(other, 2)
	require.NoError(t, s.Acquire(ctx, 1))
	require.NoError(t, cl.Servers[2].Client(t).ScriptFlush(ctx).Err())
	cl.StartMigration(t, 2, lockKey(name), "{"+name+"}:fence")
	requireHeldThroughMigration(t, ctx, cl, m, s, "while its slot migrated to a master without the script", lockKey(name), "{"+other+"}:sem")
	// (An Unlock is refused while the slot migrates: see the README.)
	cl.MoveSlot(t, redistest.KeySlot(lockKey(name)), 2)
	require.NoError(t, m.Unlock(ctx))
}

// coldFrozenCluster returns a Client on a private cluster, through a
// default-options cluster client with the given ReadTimeout whose slot map
// is loaded (an IsLocked of the returned name, a MULTI of reads, which
// needs no policy) but not its command table, and whose masters were then
// frozen.
func coldFrozenCluster(t *testing.T, readTimeout time.Duration) (*redlatch.Client, string) {
	t.Helper()
	cl := redistest.NewCluster(t, 3) // private: the test freezes its masters
	c := newClientOn(t, cl.DefaultOptionsClient(t, func(o *redis.ClusterOptions) { o.ReadTimeout = readTimeout }))
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	locked, err := c.Mutex(name).IsLocked(ctxT(t, 5*time.Second))
	require.NoError(t, err)
	require.False(t, locked)
	for _, srv := range cl.Servers {
		freeze(t, srv)
	}
	return c, name
}

// TestColdCommandTableOnDefaultOptions: a *redis.ClusterClient routes each
// command by its request policy, from the command table it loads (COMMAND)
// before the first command it routes so, with context.Background() when
// ContextTimeoutEnabled is off: on up to 3 nodes in turn, each until the
// ReadTimeout (here 2s) when it does not answer. A cluster client whose
// slot map is loaded (an IsLocked, a MULTI of reads, which needs no
// policy) but not its command table, whose masters then stop answering: a
// Semaphore.Available returns by its ctx, and a TryLock by its ctx and its
// undo's bound. They returned after 6s and 13s (3 ReadTimeouts, and 3 more
// for the undo's call).
func TestColdCommandTableOnDefaultOptions(t *testing.T) {
	c, name := coldFrozenCluster(t, 2*time.Second)
	m, s := c.Mutex(name), c.Semaphore(name, 2)
	failsWithin(t, "Available", time.Second, func(ctx context.Context) error { _, err := s.Available(ctx); return err })
	failsWithin(t, "TryLock", 300*time.Millisecond+2*time.Second+700*time.Millisecond, func(ctx context.Context) error {
		_, err := m.TryLock(ctx)
		require.ErrorIs(t, err, redlatch.ErrNotObtained)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		return err
	})
}

// TestColdCommandTableLoadFailsBeforeCtx: as TestColdCommandTableOnDefaultOptions,
// with a ctx that outlasts one failed load of the command table (3
// ReadTimeouts): the call must still return by its ctx, not wait for
// go-redis's own load, unbounded, after the background one failed.
func TestColdCommandTableLoadFailsBeforeCtx(t *testing.T) {
	c, name := coldFrozenCluster(t, 500*time.Millisecond)
	s := c.Semaphore(name, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := s.Available(ctx)
	took := time.Since(start)
	t.Logf("Available: %v after %v", err, took)
	require.Error(t, err)
	require.Less(t, took, 2500*time.Millisecond, "Available outlasted its 2s ctx")
}

// TestCommandTableRefusedWithNoReadTimeout: a cluster client with no read
// timeout (ReadTimeout -1, stored as 0) whose COMMAND is refused by ACL
// (NOPERM, at once). A load of the command table that fails at once is not
// one that met a node that does not answer: the call goes on, as it does
// with a ReadTimeout. It must not send COMMAND again and again while its
// ctx lasts, and then fail.
func TestCommandTableRefusedWithNoReadTimeout(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 10*time.Second)
	for _, srv := range cl.Servers {
		require.NoError(t, srv.Client(t).Do(ctx, "ACL", "SETUSER", "default", "-command").Err())
	}
	c := newClientOn(t, cl.DefaultOptionsClient(t, func(o *redis.ClusterOptions) { o.ReadTimeout = -1 }))
	m := c.Mutex(nameOn(t, cl, 1, redistest.UniqueName(t)))
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	start := time.Now()
	err := m.Lock(lctx)
	took := time.Since(start)
	refused := 0
	for _, srv := range cl.Servers {
		info, ierr := srv.Client(t).Info(ctx, "errorstats").Result()
		require.NoError(t, ierr)
		var n int
		if i := strings.Index(info, "errorstat_NOPERM:count="); i >= 0 {
			_, _ = fmt.Sscanf(info[i+len("errorstat_NOPERM:count="):], "%d", &n)
		}
		refused += n
	}
	t.Logf("Lock: %v after %v; COMMAND refused %d times", err, took, refused)
	require.NoError(t, err)
	require.Less(t, took, time.Second)
	require.Less(t, refused, 20, "COMMAND sent again and again")
	require.NoError(t, m.Unlock(ctx))
}

// moveOnTryAgain is a node-client hook that, once armed, counts the
// TRYAGAIN replies to script calls naming key, and on the n-th one has the
// test move the slot (move) before the reply reaches the cluster client.
type moveOnTryAgain struct {
	passHook
	key   string
	n     int32
	armed atomic.Bool
	seen  atomic.Int32
	move  func()
}

func (h *moveOnTryAgain) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		args := cmd.Args()
		if !h.armed.Load() || err == nil || !strings.HasPrefix(err.Error(), "TRYAGAIN") ||
			(cmd.Name() != "evalsha" && cmd.Name() != "eval") || len(args) < 4 || args[3] != h.key {
			return err
		}
		if h.seen.Add(1) == h.n {
			h.move()
		}
		return err
	}
}

// TestFairUnlockRidesOutSlotMovedDuringRetries: while a FairMutex's slot
// migrates with its queue's keys moved (the hash and fence key still on
// the old master), its Unlock (the grant to a queued waiter) is refused
// with TRYAGAIN. go-redis retries a TRYAGAIN up to MaxRedirects (3 by
// default: 4 attempts) and counts those retries against the same bound
// as its redirections: when the slot moves just before its last attempt,
// that attempt is answered MOVED, and go-redis returns the MOVED itself,
// unfollowed. tryAgainHook resent only a TRYAGAIN, so the Unlock failed
// with the raw "MOVED <slot> <addr>" reply, the hold was not released and
// the queued waiter was stranded until the lease bound (30 s), on about
// one migration in three. The slot is moved here on the third TRYAGAIN
// of the Unlock's first go-redis call, so that its fourth gets MOVED.
func TestFairUnlockRidesOutSlotMovedDuringRetries(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 40*time.Second)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	tag := "{" + name + "}"
	slot := redistest.KeySlot(tag)

	moveNow, moved := make(chan struct{}), make(chan struct{})
	hook := &moveOnTryAgain{key: tag + ":fair", n: 3, move: func() {
		close(moveNow)
		<-moved
	}}
	cc := cl.DefaultOptionsClient(t)
	cc.OnNewNode(func(n *redis.Client) { n.AddHook(hook) })
	holderC := newClientOn(t, cc)
	waiterC := newClientOn(t, cl.DefaultOptionsClient(t))

	holder := holderC.FairMutex(name)
	require.NoError(t, holder.Lock(ctx))
	waiter := waiterC.FairMutex(name)
	got := make(chan error, 1)
	go func() { got <- waiter.Lock(ctx) }()
	require.Eventually(t, func() bool {
		n, err := cl.Servers[1].Client(t).ZCard(ctx, tag+":fairq").Result()
		return err == nil && n == 1
	}, 5*time.Second, 10*time.Millisecond, "the waiter did not queue")

	// The queue's keys move; the hash and the fence key stay: the Unlock's
	// script, naming them all, is refused with TRYAGAIN on the old master.
	cl.StartMigration(t, 2, tag+":fairq", tag+":fairx")
	hook.armed.Store(true)
	unlocked := make(chan error, 1)
	go func() { unlocked <- holder.Unlock(ctx) }()
	select {
	case <-moveNow:
	case err := <-unlocked:
		t.Fatalf("the Unlock was not refused while the slot migrated: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the Unlock was not refused with TRYAGAIN")
	}
	cl.MoveSlot(t, slot, 2)
	released := time.Now()
	close(moved)

	select {
	case err := <-unlocked:
		require.NoError(t, err, "Unlock while its slot moved")
	case <-time.After(10 * time.Second):
		t.Fatal("the Unlock did not return after the slot moved")
	}
	select {
	case err := <-got:
		require.NoError(t, err)
		require.Less(t, time.Since(released), 5*time.Second, "the waiter's grant after the slot moved")
	case <-time.After(15 * time.Second):
		t.Fatal("the queued waiter was not granted the lock after the Unlock")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// cancelOnTryAgain, added to a cluster client after redlatch.New (so that
// it runs inside tryAgainHook), cancels a script call's ctx, registered
// under the script's first key, when the cluster client returns TRYAGAIN
// for it: once go-redis's own retries ran out, before tryAgainHook's next
// send, as a deadline passing during tryAgainHook's backoff does.
type cancelOnTryAgain struct {
	passHook
	mu   sync.Mutex
	arms map[string]func() // first key → the call's cancel
	tags map[string]string // first key → the armed call's ctx tag, if any (see armFor)
}

// armTag, as a ctx key, tells an armed call (see armFor) from another
// call on its key: an earlier call's undo, in the background, carries
// that call's ctx values.
type armTag struct{}

// armFor arms key for the calls whose ctx carries tag only, and returns
// ctx with tag.
func (h *cancelOnTryAgain) armFor(ctx context.Context, key, tag string, cancel func()) context.Context {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.arms[key] = cancel
	if h.tags == nil {
		h.tags = map[string]string{}
	}
	h.tags[key] = tag
	return context.WithValue(ctx, armTag{}, tag)
}

// cancelOnTryAgainRig returns a test's ctx, a private cluster and a Client
// on it whose script calls' ctxs can be armed to end in tryAgainHook's
// backoff.
func cancelOnTryAgainRig(t *testing.T) (context.Context, *redistest.Cluster, *redis.ClusterClient, *redlatch.Client, *cancelOnTryAgain) {
	t.Helper()
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 30*time.Second)
	cc := cl.Client(t)
	c := newClientOn(t, cc)
	hook := &cancelOnTryAgain{arms: map[string]func(){}}
	cc.AddHook(hook) // after New: inside tryAgainHook
	return ctx, cl, cc, c, hook
}

// warmMutexOn returns a lock name on master 1 of cl, its hash tag, and a
// Mutex of it on c, locked and unlocked once: the slot map is loaded, the
// fence key exists.
func warmMutexOn(t *testing.T, ctx context.Context, cl *redistest.Cluster, c *redlatch.Client) (string, string, *redlatch.Mutex) {
	t.Helper()
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	m := c.Mutex(name)
	require.NoError(t, m.Lock(ctx))
	require.NoError(t, m.Unlock(ctx))
	return name, "{" + name + "}", m
}

func (h *cancelOnTryAgain) arm(key string, cancel func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.arms[key] = cancel
}

func (h *cancelOnTryAgain) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		args := cmd.Args()
		if err == nil || !strings.HasPrefix(err.Error(), "TRYAGAIN") ||
			(cmd.Name() != "evalsha" && cmd.Name() != "eval") || len(args) < 4 {
			return err
		}
		key, _ := args[3].(string)
		h.mu.Lock()
		defer h.mu.Unlock()
		if tag, ok := h.tags[key]; ok && ctx.Value(armTag{}) != tag {
			return err
		}
		if cancel := h.arms[key]; cancel != nil {
			cancel()
			delete(h.arms, key)
			delete(h.tags, key)
		}
		return err
	}
}

// TestReleaseCtxEndsWhileSlotMigrates: while a lock's slot migrates, Redis
// refuses every release script with TRYAGAIN (each names a wake-up
// channel, never a key), and tryAgainHook sends it again until its ctx
// ends. An RUnlock, Unlock or Release whose ctx ends meanwhile is a release
// whose ctx ended on its way: it returns the context's error and is sent
// again with a fresh context (see the package doc). When the ctx ended
// during tryAgainHook's backoff (where such a call spends most of its
// time; only during go-redis's own retries did it get ctx's error), it
// returned the raw TRYAGAIN reply instead, taken for a refusal with a
// known outcome: nothing was sent again, and the read hold, the write hold,
// the Mutex hold and the permits stayed in Redis for their whole lease
// (30 s) after the slot had moved, locking out the writers and permit
// waiters for holds their holders had let go. (Found by a reviewer.)
func TestReleaseCtxEndsWhileSlotMigrates(t *testing.T) {
	ctx, cl, _, c, hook := cancelOnTryAgainRig(t)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	wname := nameOn(t, cl, 1, redistest.UniqueName(t)+"-w")
	tag, wtag := "{"+name+"}", "{"+wname+"}"

	reader := c.RWMutex(name)
	require.NoError(t, reader.RLock(ctx))
	sem := c.Semaphore(name, 2)
	require.NoError(t, sem.Acquire(ctx, 2))
	writer := c.RWMutex(wname)
	require.NoError(t, writer.Lock(ctx))
	mname := nameOn(t, cl, 1, redistest.UniqueName(t)+"-m")
	mtag := "{" + mname + "}"
	mutex := c.Mutex(mname)
	require.NoError(t, mutex.Lock(ctx))

	// The read hold's hash moves, the permit set stays on the old master;
	// the writer's hash and fence key move.
	cl.StartMigration(t, 2, tag+":rw")
	cl.StartMigration(t, 2, wtag+":rw", wtag+":fence")
	cl.StartMigration(t, 2, mtag+":lock", mtag+":fence")
	rel := func(key string, f func(context.Context) error) <-chan error {
		rctx, cancel := context.WithCancel(ctx)
		hook.arm(key, cancel)
		got := make(chan error, 1)
		go func() {
			defer cancel()
			got <- f(rctx)
		}()
		return got
	}
	runlocked := rel(tag+":rw", reader.RUnlock)
	unlocked := rel(wtag+":rw", writer.Unlock)
	munlocked := rel(mtag+":lock", mutex.Unlock)
	released := rel(tag+":sem", func(ctx context.Context) error { return sem.Release(ctx, 2) })
	time.Sleep(300 * time.Millisecond) // their ctx cancelled, still refused
	cl.MoveSlot(t, redistest.KeySlot(tag), 2)
	cl.MoveSlot(t, redistest.KeySlot(wtag), 2)
	cl.MoveSlot(t, redistest.KeySlot(mtag), 2)

	for what, got := range map[string]<-chan error{"RUnlock": runlocked, "Unlock": unlocked, "Mutex.Unlock": munlocked} {
		select {
		case err := <-got:
			require.ErrorIs(t, err, context.Canceled, "%s whose ctx ended during the migration", what)
		case <-time.After(5 * time.Second):
			t.Fatalf("%s did not return", what)
		}
	}
	select {
	case err := <-released:
		require.NoError(t, err, "Release whose ctx ended during the migration, sent again")
	case <-time.After(5 * time.Second):
		t.Fatal("Release did not return")
	}

	// The holds are gone from Redis (the releases were sent again), long
	// before their 30 s lease.
	other := newClientOn(t, cl.Client(t))
	requireTakes(t, ctx, other.RWMutex(name), 3*time.Second, "the read hold stayed in Redis after its RUnlock")
	requireTakes(t, ctx, other.RWMutex(wname), 3*time.Second, "the write hold stayed in Redis after its Unlock")
	requireTakes(t, ctx, other.Mutex(mname), 3*time.Second, "the Mutex hold stayed in Redis after its Unlock")
	n, err := other.Semaphore(name, 2).Available(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 2, n, "the permits stayed in Redis after their Release")
}

// TestColdCommandTableNoDeadline: as TestColdCommandTableLoadFailsBeforeCtx,
// with a ctx that has no deadline. With no ctx deadline, go-redis bounds a
// call to a cluster that does not answer by its ReadTimeouts (here 300ms:
// 3 loads of the command table, and the call's own attempts). redlatch's
// background load of the table (see cmdInfoLoad) must not start load after
// load "while ctx lasts": with no deadline, the call never returned while
// the masters did not answer. (Found by a reviewer.)
func TestColdCommandTableNoDeadline(t *testing.T) {
	c, name := coldFrozenCluster(t, 300*time.Millisecond)
	s := c.Semaphore(name, 2)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		_, err := s.Available(context.Background())
		done <- err
	}()
	select {
	case err := <-done:
		t.Logf("Available: %v after %v", err, time.Since(start))
		require.Error(t, err)
	case <-time.After(15 * time.Second):
		t.Fatal("Available with no ctx deadline still waiting after 15s (ReadTimeout 300ms)")
	}
}

// TestAcquireCtxEndsWhileSlotMigrates: while a free lock's slot migrates,
// Redis refuses every acquisition script (TRYAGAIN), and tryAgainHook sends
// it again until its ctx ends. A refused script did not run: an acquisition
// whose ctx ends so took nothing, and its wait ends with its ctx. Since
// tryAgainHook returns ctx's error there (so that a release is sent
// again), an acquisition took it for an unknown outcome and undid it, in
// the call, with a cleanup context: the undo (a release script, which
// names a wake-up channel) was refused too, for the whole cleanup timeout
// (2s), and then sent again in the background. A Lock, TryLock, RLock or
// Acquire whose ctx ended during tryAgainHook's backoff returned 2s after
// its ctx ended; and a latch's TrySetCount, sent again with a cleanup
// context to learn its outcome, refused for 2s too. (Found by a reviewer
// of that change.)
func TestAcquireCtxEndsWhileSlotMigrates(t *testing.T) {
	ctx, cl, _, c, hook := cancelOnTryAgainRig(t)
	name, tag, m := warmMutexOn(t, ctx, cl, c)
	// Each other primitive once too.
	rw := c.RWMutex(name)
	require.NoError(t, rw.RLock(ctx))
	require.NoError(t, rw.RUnlock(ctx))
	s := c.Semaphore(name, 2)
	require.NoError(t, s.Acquire(ctx, 1))
	require.NoError(t, s.Release(ctx, 1))
	f := c.FairMutex(name)
	require.NoError(t, f.Lock(ctx))
	require.NoError(t, f.Unlock(ctx))

	// The fence key moves, the slot does not: every acquisition of the
	// free lock is refused (ASK, then TRYAGAIN on the importing master).
	cl.StartMigration(t, 2, tag+":fence")
	var late []string
	for _, tc := range []struct {
		what, key string
		call      func(context.Context) error
		notWait   bool
	}{
		{"Mutex.Lock", tag + ":lock", m.Lock, false},
		{"Mutex.TryLock", tag + ":lock", func(ctx context.Context) error {
			ok, err := m.TryLock(ctx)
			require.False(t, ok)
			return err
		}, false},
		{"RWMutex.RLock", tag + ":rw", rw.RLock, false},
		// Its leaving of the writers' queue, a script too, was left in
		// the call: it named only the owner, and in the background it
		// could remove the place of the handle's next Lock.
		{"RWMutex.Lock", tag + ":rw", rw.Lock, false},
		// Its withdrawal, a release script, was left in the call.
		{"FairMutex.Lock", tag + ":fair", f.Lock, false},
		{"FairMutex.TryLock", tag + ":fair", func(ctx context.Context) error {
			ok, err := f.TryLock(ctx)
			require.False(t, ok)
			return err
		}, false},
		{"Semaphore.Acquire", tag + ":sem", func(ctx context.Context) error { return s.Acquire(ctx, 1) }, false},
		{"CountDownLatch.TrySetCount", tag + ":latch", func(ctx context.Context) error {
			_, err := c.CountDownLatch(name).TrySetCount(ctx, 1)
			return err
		}, true},
	} {
		wctx, cancel := context.WithCancel(ctx)
		// Ends wctx in tryAgainHook's backoff; not at the TRYAGAIN of the
		// undo of an earlier case's call, in the background.
		wctx = hook.armFor(wctx, tc.key, tc.what, cancel)
		start := time.Now()
		err := tc.call(wctx)
		took := time.Since(start)
		cancel()
		if tc.notWait {
			require.ErrorIs(t, err, context.Canceled, tc.what)
		} else {
			requireWaitErr(t, err, wctx)
		}
		if took > time.Second {
			late = append(late, fmt.Sprintf("%s took %v", tc.what, took.Round(time.Millisecond)))
		}
	}
	require.Empty(t, late, "acquisitions refused until their ctx ended returned late")
	cl.MoveSlot(t, redistest.KeySlot(tag), 2)
	// Nothing was taken.
	ok, err := newClientOn(t, cl.Client(t)).Mutex(name).TryLock(ctx)
	require.NoError(t, err)
	require.True(t, ok)
}

// lostThenRefused, added to a cluster client after cancelOnTryAgainRig's
// hook (so that it runs inside it), lets the next script call on key run
// in Redis, then calls migrate and sends the very same command again, as
// go-redis does after a lost reply (EOF: it retries the node, MaxRetries
// and MaxRedirects): the keys moved meanwhile, and that send is refused.
// On a master's node client it does the same to the next pipeline whose
// first command is such a script call (runSynced's script and WAIT).
type lostThenRefused struct {
	passHook
	mu      sync.Mutex
	key     string
	migrate func()
}

// take returns migrate, once, when cmd is a script call on key; else nil.
func (h *lostThenRefused) take(cmd redis.Cmder) func() {
	args := cmd.Args()
	if (cmd.Name() != "evalsha" && cmd.Name() != "eval") || len(args) < 4 {
		return nil
	}
	key, _ := args[3].(string)
	h.mu.Lock()
	defer h.mu.Unlock()
	migrate := h.migrate
	if key != h.key {
		return nil
	}
	h.migrate = nil
	return migrate
}

func (h *lostThenRefused) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		migrate := h.take(cmd)
		if migrate == nil {
			return next(ctx, cmd)
		}
		if err := next(ctx, cmd); err != nil {
			return err // not run: nothing to show
		}
		migrate()
		cmd.SetErr(nil)
		return next(ctx, cmd)
	}
}

func (h *lostThenRefused) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		var migrate func()
		if len(cmds) > 0 {
			migrate = h.take(cmds[0])
		}
		if migrate == nil {
			return next(ctx, cmds)
		}
		if _ = next(ctx, cmds); cmds[0].Err() != nil {
			return cmds[0].Err() // not run: nothing to show
		}
		migrate()
		for _, cmd := range cmds {
			cmd.SetErr(nil)
		}
		return next(ctx, cmds)
	}
}

// TestAcquireRunThenRefusedUntilCtxEndsIsUndone: an acquisition's script
// ran (the lock taken) but its reply was lost; go-redis sent it again,
// and by then a key of the slot had moved: TRYAGAIN, which tryAgainHook
// sends again until the call's ctx ends, and it returns refusedErr, "known
// not to have run". It did run, at the first send, which tryAgainHook
// never sees: the acquisition was not undone, and the lock stayed held by
// nobody for the hold's whole lease after Lock had failed. (Found by a
// reviewer of that change.)
func TestAcquireRunThenRefusedUntilCtxEndsIsUndone(t *testing.T) {
	ctx, cl, cc, c, hook := cancelOnTryAgainRig(t)
	name, tag, m := warmMutexOn(t, ctx, cl, c)

	cc.AddHook(fenceMovesAfterRun(t, cl, name)) // inside hook

	wctx, cancel := context.WithCancel(ctx)
	hook.arm(tag+":lock", cancel) // ends wctx in tryAgainHook's backoff
	err := m.Lock(wctx)
	cancel()
	requireRunThenRefusedUndone(t, ctx, cl, name, wctx, err)
}

// readUndoGate, added innermost to a cluster client, holds the read
// releases (rw_runlock.lua: three keys, the first the lock hash) of one
// lock until open is closed, and counts the read attempts (rw_rlock.lua:
// two keys) that Redis answered with a refusal ({0, retry}), closing
// refused2 at the second.
type readUndoGate struct {
	passHook
	key      string
	armed    atomic.Bool
	held     chan struct{} // closed when a release reached the gate
	heldOnce sync.Once
	open     chan struct{}
	refused  atomic.Int32
	refused2 chan struct{}
}

func (h *readUndoGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if !h.armed.Load() || (cmd.Name() != "evalsha" && cmd.Name() != "eval") || len(args) < 4 {
			return next(ctx, cmd)
		}
		if key, _ := args[3].(string); key != h.key {
			return next(ctx, cmd)
		}
		numkeys, _ := args[2].(int)
		switch numkeys {
		case 3: // rw_runlock.lua
			h.heldOnce.Do(func() { close(h.held) })
			<-h.open
			return next(ctx, cmd)
		case 2: // rw_rlock.lua
			err := next(ctx, cmd)
			if c, ok := cmd.(*redis.Cmd); ok && err == nil {
				if res, _ := c.Slice(); len(res) >= 2 {
					if s, _ := res[0].(int64); s == 0 && h.refused.Add(1) == 2 {
						close(h.refused2)
					}
				}
			}
			return err
		}
		return next(ctx, cmd)
	}
}

// TestRWRLockWokenByBackgroundUndoOfOwnReadHold: an RLock whose attempt
// took the read lock but lost its reply, then was refused by a migrating
// slot until its ctx ended, is undone in the background (see refusedErr).
// Until that undo lands, the owner's read hold is in Redis while the
// handle counts none: the handle's next RLock may not re-enter it (see
// mayReenter) and waits for it to end. The undo ends it, but a read
// release publishes to writers only, and only a resent release woke the
// handle's own readers: the RLock slept for the read hold's whole lease
// (the watchdog timeout, 30s) although the lock was free. (Found by a
// reviewer.)
func TestRWRLockWokenByBackgroundUndoOfOwnReadHold(t *testing.T) {
	ctx, cl, cc, c, hook := cancelOnTryAgainRig(t)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	tag := "{" + name + "}"
	m := c.RWMutex(name)
	require.NoError(t, m.RLock(ctx)) // the slot map is loaded, the fence key exists
	require.NoError(t, m.RUnlock(ctx))

	lost := &lostThenRefused{key: tag + ":rw", migrate: func() {
		// The fence key moves, the lock hash does not: TRYAGAIN.
		cl.StartMigration(t, 2, tag+":fence")
	}}
	cc.AddHook(lost) // inside hook
	gate := &readUndoGate{key: tag + ":rw", held: make(chan struct{}), open: make(chan struct{}), refused2: make(chan struct{})}
	cc.AddHook(gate) // innermost
	var openOnce sync.Once
	openGate := func() { openOnce.Do(func() { close(gate.open) }) }
	t.Cleanup(openGate)
	gate.armed.Store(true)

	wctx, cancel := context.WithCancel(ctx)
	hook.arm(tag+":rw", cancel) // ends wctx in tryAgainHook's backoff
	err := m.RLock(wctx)
	cancel()
	requireWaitErr(t, err, wctx)

	// The undo of that RLock is on its way, in the background: held.
	select {
	case <-gate.held:
	case <-time.After(5 * time.Second):
		t.Fatal("no undo of the failed RLock")
	}
	cl.MoveSlot(t, redistest.KeySlot(tag), 2)

	// The handle's next RLock finds the owner's read hold (the undo's) and
	// waits for it: refused at its first attempt and at the one after it
	// joined the readers' channel.
	got := make(chan error, 1)
	rctx, rcancel := context.WithTimeout(ctx, 15*time.Second)
	defer rcancel()
	go func() { got <- m.RLock(rctx) }()
	select {
	case <-gate.refused2:
	case err := <-got:
		t.Fatalf("RLock returned before waiting: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("the RLock did not wait for the owner's read hold")
	}
	// The undo lands: the lock is free, and the waiting RLock should take it.
	openGate()
	select {
	case err := <-got:
		require.NoError(t, err)
	case <-time.After(3 * time.Second):
		held, err := m.IsLocked(ctx)
		require.NoError(t, err)
		t.Fatalf("the RLock waiting for its owner's undone read hold was not woken (lock held: %v)", held)
	}
	require.NoError(t, m.RUnlock(ctx))
}

// TestReplicaSyncRunThenRefusedUntilCtxEndsIsUndone is
// TestAcquireRunThenRefusedUntilCtxEndsIsUndone under WithReplicaSync: the
// script and WAIT go to the master in one pipeline, sent by runSynced; the
// script ran (the lock taken), its reply was lost, and go-redis's resend
// was refused with TRYAGAIN (a key of the slot had moved). runSynced sends
// it again until the call's ctx ends and returned the TRYAGAIN reply, "known
// not to have run": the acquisition was not undone, and the lock stayed
// held by nobody for its whole lease after Lock had failed. (Found by a
// reviewer.)
func TestReplicaSyncRunThenRefusedUntilCtxEndsIsUndone(t *testing.T) {
	ctx, cl, name, m := lostRunClusterMutex(t, true)
	wctx, cancel := context.WithTimeout(ctx, time.Second)
	err := m.Lock(wctx)
	cancel()
	requireRunThenRefusedUndone(t, ctx, cl, name, wctx, err)
}

// fenceMovesAfterRun returns a lostThenRefused for the next script call on
// the lock hash of the Mutex name: after it ran, the fence key starts
// moving to master 2 and the lock hash does not, so its resend is refused
// (TRYAGAIN).
func fenceMovesAfterRun(t *testing.T, cl *redistest.Cluster, name string) *lostThenRefused {
	return &lostThenRefused{key: lockKey(name), migrate: func() {
		cl.StartMigration(t, 2, "{"+name+"}:fence")
	}}
}

// requireRunThenRefusedUndone checks that the Lock of the Mutex name, whose
// run a lostThenRefused lost (see fenceMovesAfterRun), failed with a wait
// error of wctx, not the TRYAGAIN, and, once the slot moved to master 2,
// that what that run took was given back: the lock is free well within its
// lease (30s).
func requireRunThenRefusedUndone(t *testing.T, ctx context.Context, cl *redistest.Cluster, name string, wctx context.Context, err error) {
	t.Helper()
	requireWaitErr(t, err, wctx)
	require.False(t, strings.HasPrefix(err.Error(), "TRYAGAIN"), err.Error())
	requireFreeAfterMove(t, ctx, cl, name)
}

// requireFreeAfterMove moves the slot of the lock name to master 2 and
// requires the lock to be free well within its lease (30s): what a lost
// run took was given back.
func requireFreeAfterMove(t *testing.T, ctx context.Context, cl *redistest.Cluster, name string) {
	t.Helper()
	cl.MoveSlot(t, redistest.KeySlot("{"+name+"}"), 2)
	requireTakes(t, ctx, newClientOn(t, cl.Client(t)).Mutex(name), 5*time.Second, "the hold of a Lock that failed is still in Redis")
}

// lostRunClusterMutex returns a 60s context, a 3-master cluster, a lock
// name on master 1 and a Mutex of it on a Client of the cluster (with a
// replica and WithReplicaSync when synced) whose next acquisition runs in
// Redis, its reply lost, and is refused from then on (fenceMovesAfterRun:
// on the master's node client when synced, where runSynced sends it, else
// inside tryAgainHook).
func lostRunClusterMutex(t *testing.T, synced bool) (context.Context, *redistest.Cluster, string, *redlatch.Mutex) {
	t.Helper()
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	var opts []redlatch.Option
	if synced {
		cl.AddReplica(t, lockKey(name))
		opts = append(opts, redlatch.WithReplicaSync(1, 300*time.Millisecond))
	}
	cc := cl.Client(t)
	m := newClientOn(t, cc, opts...).Mutex(name)
	require.NoError(t, m.Lock(ctx)) // the slot map is loaded, the fence key exists
	require.NoError(t, m.Unlock(ctx))
	if synced {
		node, err := cc.MasterForKey(ctx, lockKey(name))
		require.NoError(t, err)
		node.AddHook(fenceMovesAfterRun(t, cl, name))
	} else {
		cc.AddHook(fenceMovesAfterRun(t, cl, name)) // inside tryAgainHook
	}
	return ctx, cl, name, m
}

// TestAcquireRunThenRefusedPastTryAgainWaitIsUndone:
// TestAcquireRunThenRefusedUntilCtxEndsIsUndone and
// TestReplicaSyncRunThenRefusedUntilCtxEndsIsUndone with a ctx that
// outlives the 5s for which tryAgainHook (or runSynced) sends a refused
// script again: the script ran (the lock taken), its reply was lost, and
// go-redis's resend and every later one were refused with TRYAGAIN. After
// tryAgainWait the call returned the raw TRYAGAIN reply, which counted as
// "did not run": the acquisition was not undone, and the lock stayed held
// by nobody for its whole lease (30s) after Lock had failed. (Found by a
// reviewer of 5b50459.)
func TestAcquireRunThenRefusedPastTryAgainWaitIsUndone(t *testing.T) {
	for _, synced := range []bool{false, true} {
		t.Run(fmt.Sprintf("synced=%v", synced), func(t *testing.T) {
			t.Parallel() // each on a cluster of its own; most of it is waiting
			ctx, cl, name, m := lostRunClusterMutex(t, synced)
			wctx, cancel := context.WithTimeout(ctx, 20*time.Second) // outlives tryAgainWait (5s)
			err := m.Lock(wctx)
			require.Error(t, err)
			require.NoError(t, wctx.Err(), "Lock returned at the 5s bound, not at its ctx's end")
			cancel()
			requireFreeAfterMove(t, ctx, cl, name)
		})
	}
}

// TestWriterRefusedPastTryAgainWaitReturnsWithCtx: while a free lock's
// fence key migrates (the slot does not), every attempt of an RWMutex's
// Lock or a FairMutex's Lock is refused (ASK, then TRYAGAIN). tryAgainHook
// gives up after tryAgainWait (5s) with ctx alive, and the TRYAGAIN reply
// now counts as an unknown outcome (2136889): RWMutex.Lock then left the
// writers' queue, and FairMutex.Lock withdrew, in the call, with a cleanup
// context, refused too for the whole cleanup timeout (2s). A Lock whose
// ctx ends 5.5s after it began returned about 1.5s after its ctx. (Found
// by a reviewer of 2136889.)
func TestWriterRefusedPastTryAgainWaitReturnsWithCtx(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	c := newClientOn(t, cl.Client(t))
	name, tag, _ := warmMutexOn(t, ctx, cl, c)
	rw := c.RWMutex(name)
	require.NoError(t, rw.Lock(ctx))
	require.NoError(t, rw.Unlock(ctx))
	f := c.FairMutex(name)
	require.NoError(t, f.Lock(ctx))
	require.NoError(t, f.Unlock(ctx))

	cl.StartMigration(t, 2, tag+":fence")
	// Both at once: most of each is waiting.
	var wg sync.WaitGroup
	for _, tc := range []struct {
		what string
		call func(context.Context) error
	}{
		{"RWMutex.Lock", rw.Lock},
		{"FairMutex.Lock", f.Lock},
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wctx, cancel := context.WithTimeout(ctx, 5500*time.Millisecond) // outlives tryAgainWait (5s)
			defer cancel()
			deadline, _ := wctx.Deadline()
			err := tc.call(wctx)
			late := time.Since(deadline)
			assert.Error(t, err, tc.what)
			assert.Less(t, late, 500*time.Millisecond, "%s returned %v after its ctx ended (%v)", tc.what, late.Round(time.Millisecond), err)
		}()
	}
	wg.Wait()
	require.False(t, t.Failed())
	cl.MoveSlot(t, redistest.KeySlot(tag), 2)
	// Nothing was left taken or queued.
	c2 := newClientOn(t, cl.Client(t))
	require.Eventually(t, func() bool {
		ok, err := c2.RWMutex(name).TryLock(ctx)
		return err == nil && ok
	}, 5*time.Second, 50*time.Millisecond)
	ok, err := c2.FairMutex(name).TryLock(ctx)
	require.NoError(t, err)
	require.True(t, ok)
}

// resendMovesSlot, added to a cluster client before New (outside
// tryAgainHook), calls move before the second script call on key that
// reaches it once armed: the caller's own resend of a call that
// tryAgainHook gave up on, sent with the same request id.
type resendMovesSlot struct {
	passHook
	mu    sync.Mutex
	key   string
	armed bool
	seen  int
	move  func()
}

func (h *resendMovesSlot) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if (cmd.Name() == "evalsha" || cmd.Name() == "eval") && len(args) >= 4 {
			if key, _ := args[3].(string); key == h.key {
				h.mu.Lock()
				var move func()
				if h.armed {
					if h.seen++; h.seen == 2 {
						move = h.move
					}
				}
				h.mu.Unlock()
				if move != nil {
					move()
				}
			}
		}
		return next(ctx, cmd)
	}
}

// TestForceUnlockRunThenRefusedPastTryAgainWait: a ForceUnlock runs in
// Redis (the holder's hold released), its reply is lost, and go-redis's
// resend is refused because a key of the lock's slot has started migrating
// (TRYAGAIN). tryAgainHook sends it again for tryAgainWait (5s), then
// returns the TRYAGAIN reply, and ForceUnlock returned (false, TRYAGAIN):
// "nothing was held" and "refused, did not run", though it had released a
// hold. An operator who calls again on that refusal force-unlocks whoever
// took the lock since. The script carries a request id and Redis remembers
// what its first run did (see fence_force.lua): sent again (Client.runOnce,
// as the latch's calls are), it answers true. (Found by a reviewer.)
func TestForceUnlockRunThenRefusedPastTryAgainWait(t *testing.T) {
	t.Parallel() // see TestMain
	type forcer interface {
		ForceUnlock(context.Context) (bool, error)
	}
	cases := []struct {
		what string
		key  func(tag string) string
		make func(c *redlatch.Client, name string) (forcer, func(context.Context) error)
	}{
		{"Mutex", func(tag string) string { return tag + ":lock" }, func(c *redlatch.Client, name string) (forcer, func(context.Context) error) {
			m := c.Mutex(name)
			return m, m.Lock
		}},
		{"ReentrantMutex", func(tag string) string { return tag + ":lock" }, func(c *redlatch.Client, name string) (forcer, func(context.Context) error) {
			m := c.ReentrantMutex(name)
			return m, m.Lock
		}},
		{"RWMutex", func(tag string) string { return tag + ":rw" }, func(c *redlatch.Client, name string) (forcer, func(context.Context) error) {
			m := c.RWMutex(name)
			return m, m.RLock
		}},
		{"FairMutex", func(tag string) string { return tag + ":fair" }, func(c *redlatch.Client, name string) (forcer, func(context.Context) error) {
			m := c.FairMutex(name)
			return m, m.Lock
		}},
	}
	for _, tc := range cases {
		t.Run(tc.what, func(t *testing.T) {
			t.Parallel() // each on a cluster of its own; most of it is waiting
			cl := redistest.NewCluster(t, 3)
			ctx := ctxT(t, 60*time.Second)
			name := nameOn(t, cl, 1, redistest.UniqueName(t))
			tag := "{" + name + "}"
			key := tc.key(tag)

			// The holder, on a cluster client of its own.
			_, lock := tc.make(newClientOn(t, cl.Client(t)), name)
			require.NoError(t, lock(ctx)) // the fence key exists

			cc := cl.Client(t)
			outer := &resendMovesSlot{key: key, move: func() { cl.MoveSlot(t, redistest.KeySlot(tag), 2) }}
			cc.AddHook(outer) // before New: outside tryAgainHook
			f, _ := tc.make(newClientOn(t, cc), name)
			// The slot map is loaded, the script too: the probe finds the
			// lock held, and a ForceUnlock of another name loads the script.
			_, err := f.(interface {
				IsLocked(context.Context) (bool, error)
			}).IsLocked(ctx)
			require.NoError(t, err)
			other, _ := tc.make(newClientOn(t, cc), nameOn(t, cl, 1, redistest.UniqueName(t)+"-other"))
			_, err = other.ForceUnlock(ctx)
			require.NoError(t, err)

			// Inside tryAgainHook: the ForceUnlock runs, then the fence key
			// starts moving and go-redis's resend is refused from then on.
			cc.AddHook(&lostThenRefused{key: key, migrate: func() { cl.StartMigration(t, 2, tag+":fence") }})
			outer.mu.Lock()
			outer.armed = true
			outer.mu.Unlock()
			ok, err := f.ForceUnlock(ctx)
			var reply redis.Error
			require.False(t, errors.As(err, &reply), "a ForceUnlock that ran reported a refusal (did not run): calling again releases the next holder: %v", err)
			require.NoError(t, err)
			require.True(t, ok, "a ForceUnlock that released a hold reported none")
		})
	}
}
