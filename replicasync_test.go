package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"regexp"
	"strconv"
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

// linkProxy forwards TCP connections to a target address (the replication
// link of a replica to its master, here). Partition makes it drop every
// byte in both directions from then on, the connections staying open: the
// master still sees its replica connected, but nothing reaches it and no
// acknowledgement comes back, as in a network partition.
type linkProxy struct {
	Addr     string
	target   string
	l        net.Listener
	dropping atomic.Bool

	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func newLinkProxy(t *testing.T, target string) *linkProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &linkProxy{Addr: l.Addr().String(), target: target, l: l}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

func (p *linkProxy) accept() {
	defer p.wg.Done()
	for {
		in, err := p.l.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(in, out)
		go p.pipe(out, in)
	}
}

func (p *linkProxy) pipe(from, to net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 && !p.dropping.Load() {
			if _, werr := to.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			_ = to.Close()
			return
		}
	}
}

// Partition drops every byte from now on.
func (p *linkProxy) Partition() { p.dropping.Store(true) }

// Close closes the listener and every connection, and waits for the
// forwarding goroutines.
func (p *linkProxy) Close() {
	_ = p.l.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// replicaPair starts a master and a replica of it whose replication link
// goes through a linkProxy, and waits until the replica is in sync.
func replicaPair(t *testing.T) (master, replica *redistest.Server, link *linkProxy) {
	t.Helper()
	// No 5s wait before a (diskless) full sync, on either side of a failover.
	master = redistest.NewServer(t, "--repl-diskless-sync-delay", "0")
	link = newLinkProxy(t, master.Addr)
	host, port, _ := net.SplitHostPort(link.Addr)
	replica = redistest.NewServer(t, "--replicaof", host, port, "--repl-diskless-sync-delay", "0")
	waitInSync(t, master, replica)
	return master, replica, link
}

// waitInSync waits until the replica's link is up and a write on the master
// has reached it.
func waitInSync(t *testing.T, master, replica *redistest.Server) {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	m, r := master.Client(t), replica.Client(t)
	require.Eventually(t, func() bool {
		info, err := r.Info(ctx, "replication").Result()
		if err != nil || !strings.Contains(info, "master_link_status:up") {
			return false
		}
		if m.Set(ctx, "sync-marker", "1", 0).Err() != nil {
			return false
		}
		n, err := r.Exists(ctx, "sync-marker").Result()
		return err == nil && n == 1
	}, 15*time.Second, 20*time.Millisecond, "replica not in sync")
}

// TestReplicaSyncLive: with the replica live, locks and re-entries work
// under WithReplicaSync, every hold is on the replica when Lock returns, and
// the watchdog's replicated renewals keep a lock held.
func TestReplicaSyncLive(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	c := newClient(t, serverBackend(master), redlatch.WithReplicaSync(1, time.Second), redlatch.WithWatchdogTimeout(900*time.Millisecond))
	r := replica.Client(t)

	m := c.Mutex("sync-live")
	require.NoError(t, m.Lock(ctx))
	require.EqualValues(t, 1, r.Exists(ctx, lockKey("sync-live")).Val(), "on the replica when Lock returns")
	require.Positive(t, m.Token())
	time.Sleep(2 * time.Second) // several replicated renewals
	requireOpen(t, m.Lost(), "lock lost while replicated renewals succeed")
	require.NoError(t, m.Unlock(ctx))

	rm := c.ReentrantMutex("sync-live-re")
	require.NoError(t, rm.Lock(ctx))
	ok, err := rm.TryLock(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	n, err := r.HGet(ctx, lockKey("sync-live-re"), "c").Int()
	require.NoError(t, err)
	require.Equal(t, 2, n, "the re-entry is on the replica")
	require.NoError(t, rm.Unlock(ctx))
	require.NoError(t, rm.Unlock(ctx))

	// The other primitives' acquisitions are replicated too.
	fm := c.FairMutex("sync-live-fair")
	require.NoError(t, fm.Lock(ctx))
	require.EqualValues(t, 1, r.Exists(ctx, "{sync-live-fair}:fair").Val(), "FairMutex hold on the replica")
	require.NoError(t, fm.Unlock(ctx))
	rw := c.RWMutex("sync-live-rw")
	require.NoError(t, rw.RLock(ctx))
	require.EqualValues(t, 1, r.Exists(ctx, "{sync-live-rw}:rw").Val(), "read hold on the replica")
	require.NoError(t, rw.RUnlock(ctx))
	require.NoError(t, rw.Lock(ctx))
	require.EqualValues(t, 1, r.Exists(ctx, "{sync-live-rw}:rw").Val(), "write hold on the replica")
	require.NoError(t, rw.Unlock(ctx))
	sem := c.Semaphore("sync-live-sem", 2)
	require.NoError(t, sem.Acquire(ctx, 2))
	require.EqualValues(t, 1, r.Exists(ctx, "{sync-live-sem}:sem").Val(), "permits on the replica")
	require.NoError(t, sem.Release(ctx, 2))
}

// TestReplicaSyncPinnedOnDefaultOptions: with a sync timeout above the
// client's ReadTimeout, the script and its WAIT go on a pinned connection,
// where WAIT must follow the write. On go-redis's default options
// (ContextTimeoutEnabled off), redlatch routes its scripts through a clone
// of the client (see TestUnresponsiveRedisOnDefaultOptions), and routed a
// script on the pinned connection too: it went on a connection of the
// clone's, and the WAIT after it on the pinned one, which had written
// nothing, unless the pool happened to hand it the connection the script
// had just used. Calls on a pinned connection are not routed: a hook added
// after New, which routed calls go round, sees the acquisition's script and
// the renewals'. And with the replica frozen, an acquisition fails as not
// replicated, and a hold whose renewals no replica acknowledges is lost.
func TestReplicaSyncPinnedOnDefaultOptions(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	rdb := redis.NewClient(&redis.Options{Addr: master.Addr, ReadTimeout: 500 * time.Millisecond})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, time.Second), redlatch.WithWatchdogTimeout(900*time.Millisecond))
	inner := &scriptCounter{}
	rdb.AddHook(inner)
	held := c.Mutex(redistest.UniqueName(t))
	require.NoError(t, held.Lock(ctx))
	require.Positive(t, inner.n.Load(), "the acquisition's script was routed off its pinned connection")
	time.Sleep(400 * time.Millisecond) // a renewal
	require.Positive(t, inner.piped.Load(), "the renewal's script was routed off its pinned connection")

	replica.Stop(t)
	defer replica.Cont(t)
	ok, err := c.Mutex(redistest.UniqueName(t)).TryLock(ctx)
	require.False(t, ok)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated)
	require.Contains(t, err.Error(), "0 of 1 replicas")
	requireClosedWithin(t, held.Lost(), 3*time.Second, "renewals no replica acknowledged kept the hold")
}

// overrunHook records how long after its ctx's deadline each pipeline of
// script calls (a renewal) returned, the longest.
type overrunHook struct {
	passHook
	longest atomic.Int64 // nanoseconds
	seen    atomic.Int64
}

func (h *overrunHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if len(cmds) > 0 && cmds[0].Name() == "evalsha" {
			h.seen.Add(1)
			if d, ok := ctx.Deadline(); ok {
				over := int64(time.Since(d))
				for {
					old := h.longest.Load()
					if over <= old || h.longest.CompareAndSwap(old, over) {
						break
					}
				}
			}
		}
		return err
	}
}

// TestReplicaSyncRenewalHonoursContextOnDefaultOptions: under
// WithReplicaSync with a sync timeout well within the ReadTimeout, the
// README says only the pinned path (a sync timeout above the ReadTimeout)
// is left out of the routing through the clone: a renewal, the script
// calls and their WAIT in one pipeline, returns by its ctx's deadline on
// go-redis's default options. renewSyncedOn sent every renewal on a pinned
// connection, unrouted: with the master frozen, the renewal waited for it
// (up to the ReadTimeout) well past its deadline.
func TestReplicaSyncRenewalHonoursContextOnDefaultOptions(t *testing.T) {
	master, _, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	rdb := redis.NewClient(&redis.Options{Addr: master.Addr, ReadTimeout: 5 * time.Second})
	t.Cleanup(func() { _ = rdb.Close() })
	h := &overrunHook{}
	rdb.AddHook(h)
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, 100*time.Millisecond), redlatch.WithWatchdogTimeout(900*time.Millisecond))
	require.NoError(t, c.Mutex(redistest.UniqueName(t)).Lock(ctx))
	require.Eventually(t, func() bool { return h.seen.Load() > 0 }, 2*time.Second, 10*time.Millisecond)

	master.Stop(t)
	time.Sleep(2500 * time.Millisecond)
	master.Cont(t)
	time.Sleep(300 * time.Millisecond)
	require.Less(t, time.Duration(h.longest.Load()), 300*time.Millisecond,
		"a renewal returned long after its ctx's deadline")
}

// TestReplicaSyncStoppedReplica: with the replica frozen (SIGSTOP), an
// acquisition fails within about the sync timeout with ErrNotReplicated
// (which matches ErrNotObtained), and nothing stays held on the master; a
// lock held when the replica froze is lost (Lost closes) once its
// unreplicated renewals have let the lease run out.
func TestReplicaSyncStoppedReplica(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	timeout := 900 * time.Millisecond
	c := newClient(t, serverBackend(master), redlatch.WithReplicaSync(1, 300*time.Millisecond), redlatch.WithWatchdogTimeout(timeout))
	mc := master.Client(t)

	held := c.Mutex("sync-stopped-held")
	require.NoError(t, held.Lock(ctx))

	replica.Stop(t)
	defer replica.Cont(t)
	for _, tc := range []struct {
		name string
		lock func(context.Context) error
	}{
		{"Lock", c.Mutex("sync-stopped").Lock},
		{"TryLock", func(ctx context.Context) error {
			ok, err := c.Mutex("sync-stopped").TryLock(ctx)
			require.False(t, ok)
			return err
		}},
		{"Reentrant", c.ReentrantMutex("sync-stopped").Lock},
	} {
		start := time.Now()
		err := tc.lock(ctx)
		took := time.Since(start)
		require.ErrorIs(t, err, redlatch.ErrNotReplicated, tc.name)
		require.ErrorIs(t, err, redlatch.ErrNotObtained, tc.name)
		require.Contains(t, err.Error(), "0 of 1 replicas", tc.name)
		require.GreaterOrEqual(t, took, 300*time.Millisecond, tc.name)
		require.Less(t, took, 2*time.Second, tc.name)
		require.EqualValues(t, 0, mc.Exists(ctx, lockKey("sync-stopped")).Val(), "%s: nothing left on the master", tc.name)
	}
	// The earlier hold: its renewals are no longer replicated.
	requireClosedWithin(t, held.Lost(), 2*timeout+time.Second, "Lost with unreplicated renewals")
	require.ErrorIs(t, held.Unlock(ctx), redlatch.ErrNotHeld)
}

// TestReplicaSyncFailover is the classic failure: the master grants a lock
// while replication is cut off (a partition between master and replica),
// dies, and its replica is promoted. Without WithReplicaSync a second client
// then takes the lock the first believes it holds; with it, the first
// acquisition was refused, so no two clients ever believe they hold it.
func TestReplicaSyncFailover(t *testing.T) {
	for _, synced := range []bool{false, true} {
		name := map[bool]string{false: "without", true: "with"}[synced]
		t.Run(name, func(t *testing.T) {
			master, replica, link := replicaPair(t)
			ctx := ctxT(t, 20*time.Second)
			var opts []redlatch.Option
			if synced {
				opts = append(opts, redlatch.WithReplicaSync(1, 300*time.Millisecond))
			}
			c1 := newClientOn(t, master.Client(t), opts...)
			first := c1.Mutex("failover")

			link.Partition()
			err := first.Lock(ctx)
			if synced {
				require.ErrorIs(t, err, redlatch.ErrNotReplicated)
			} else {
				require.NoError(t, err)
			}

			master.Kill(t)
			link.Close()
			promoted := replica.Client(t)
			require.NoError(t, promoted.SlaveOf(ctx, "NO", "ONE").Err())
			c2 := newClientOn(t, promoted)
			second := c2.Mutex("failover")
			ok, err := second.TryLock(ctx)
			require.NoError(t, err)
			require.True(t, ok, "the promoted replica never saw the first hold")
			if synced {
				require.Zero(t, first.Token(), "the first client does not believe it holds the lock")
				requireErrNotHeld(t, first.Unlock(ctx))
			} else {
				require.Positive(t, first.Token(), "split brain: both believe they hold the lock")
			}
			require.NoError(t, second.Unlock(ctx))
		})
	}
}

func requireErrNotHeld(t *testing.T, err error) {
	t.Helper()
	require.True(t, errors.Is(err, redlatch.ErrNotHeld), "got %v", err)
}

// TestReplicaSyncNoReplicas: WithReplicaSync on a Redis without replicas
// (or without WAIT: miniredis) refuses every acquisition — it never reports
// a hold that no replica has — and leaves nothing held; on a cluster the
// script and WAIT go to the master of the lock's slot. A Client without
// replica sync on the same Redis is unaffected.
func TestReplicaSyncNoReplicas(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b, redlatch.WithReplicaSync(1, 50*time.Millisecond))
		for _, m := range []interface {
			TryLock(context.Context) (bool, error)
		}{c.Mutex(name), c.ReentrantMutex(name)} {
			ok, err := m.TryLock(ctx)
			require.False(t, ok)
			require.ErrorIs(t, err, redlatch.ErrNotReplicated)
			locked, err := c.Mutex(name).IsLocked(ctx)
			require.NoError(t, err)
			require.False(t, locked, "nothing left held")
		}
		fair := c.FairMutex(name)
		ok, err := fair.TryLock(ctx)
		require.False(t, ok)
		require.ErrorIs(t, err, redlatch.ErrNotReplicated)
		rw := c.RWMutex(name)
		ok, err = rw.TryLock(ctx)
		require.False(t, ok)
		require.ErrorIs(t, err, redlatch.ErrNotReplicated)
		ok, err = rw.TryRLock(ctx)
		require.False(t, ok)
		require.ErrorIs(t, err, redlatch.ErrNotReplicated)
		sem := c.Semaphore(name, 2)
		ok, err = sem.TryAcquire(ctx, 1)
		require.False(t, ok)
		require.ErrorIs(t, err, redlatch.ErrNotReplicated)
		// Nothing left held: the same primitives without replica sync take
		// everything at once.
		plainC := newClient(t, b)
		for _, l := range []interface {
			TryLock(context.Context) (bool, error)
		}{plainC.FairMutex(name), plainC.RWMutex(name)} {
			ok, err := l.TryLock(ctx)
			require.NoError(t, err)
			require.True(t, ok, "nothing left held")
		}
		ok, err = plainC.Semaphore(name, 2).TryAcquire(ctx, 2)
		require.NoError(t, err)
		require.True(t, ok, "no permit left taken")
		plain := newClient(t, b).Mutex(name)
		ok, err = plain.TryLock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, plain.Unlock(ctx))
	})
}

// TestReplicaSyncWaitEndsWithCtx: a Lock whose ctx ends while its WAIT
// blocks (the replica is frozen) fails as a wait that ctx ended: its error
// matches ctx.Err() as well as ErrNotObtained. With a WAIT timeout above the
// client's ReadTimeout the WAIT goes on its own on a pinned connection, and
// its read fails with an i/o timeout at ctx's deadline — possibly before
// ctx's own timer has fired. A FairMutex, whose failed attempt has nothing to
// undo before its error is made, then reported a plain ErrNotReplicated
// ("WAIT failed: i/o timeout") in about half the calls.
func TestReplicaSyncWaitEndsWithCtx(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	opt := master.Options()
	opt.ReadTimeout = 500 * time.Millisecond // below the WAIT timeout: pinned path
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, time.Second))
	name := redistest.UniqueName(t)
	m := c.FairMutex(name)
	require.NoError(t, m.Lock(ctx)) // the script cached, a connection open
	require.NoError(t, m.Unlock(ctx))

	replica.Stop(t)
	defer replica.Cont(t)
	for i := 0; i < 20; i++ {
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		err := m.Lock(cctx)
		cancel()
		require.ErrorIs(t, err, redlatch.ErrNotObtained, "call %d", i)
		require.ErrorIs(t, err, context.DeadlineExceeded, "call %d", i)
	}
	locked, err := m.IsLocked(ctx)
	require.NoError(t, err)
	require.False(t, locked, "nothing left held")
}

// TestReplicaSyncNoScriptWaitBound: with the replica frozen, an acquisition
// fails within about the sync timeout (README: "up to timeout when a
// replica is slow or gone") also when the script cache is empty (a restart,
// a failover to a replica, SCRIPT FLUSH). The script and WAIT are pipelined:
// the WAIT after the refused EVALSHA blocks too, for the whole timeout, and
// the one after EVAL, with the whole timeout again, doubled it.
func TestReplicaSyncNoScriptWaitBound(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	rdb := master.Client(t)
	timeout := time.Second // below the ReadTimeout (2s) with its margin: pipelined
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, timeout))
	m := c.Mutex(redistest.UniqueName(t))
	require.NoError(t, m.Lock(ctx)) // a connection open
	require.NoError(t, m.Unlock(ctx))
	require.NoError(t, rdb.ScriptFlush(ctx).Err())

	replica.Stop(t)
	defer replica.Cont(t)
	start := time.Now()
	ok, err := m.TryLock(ctx)
	took := time.Since(start)
	t.Logf("TryLock took %v", took)
	require.False(t, ok)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated)
	require.Less(t, took, timeout*8/5, "an acquisition waited %v for a %v sync timeout", took, timeout)
}

// TestReplicaSyncDuringSlotMigration: while an RWMutex's slot migrates (its
// master MIGRATING, the new one IMPORTING) and its keys have moved already,
// the old master answers a script on them with -ASK: the keys are on the
// new master, which serves them after ASKING. go-redis follows that for any
// command, so a read lock joins the readers; runSynced, which sends the
// script and WAIT itself under WithReplicaSync, must too. Here the cluster
// has no replicas, so the acquisition must run on the new master and fail
// for want of replicas (ErrNotReplicated), not with the -ASK redirection as
// its error (as it did, after 5 retries over 750ms, however long the
// migration lasts).
func TestReplicaSyncDuringSlotMigration(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 30*time.Second)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))

	// A busy RWMutex: its fence key (a writer came and went) and its hash
	// (a reader holds it).
	plain := newClientOn(t, cl.Client(t))
	w := plain.RWMutex(name)
	require.NoError(t, w.Lock(ctx))
	require.NoError(t, w.Unlock(ctx))
	require.NoError(t, plain.RWMutex(name).RLock(ctx))

	// The migration has moved the keys, not yet the slot.
	cl.StartMigration(t, 2, "{"+name+"}:rw", "{"+name+"}:fence")

	ok, err := plain.RWMutex(name).TryRLock(ctx)
	require.NoError(t, err, "without replica sync, go-redis follows -ASK")
	require.True(t, ok)

	c := newClientOn(t, cl.Client(t), redlatch.WithReplicaSync(1, 50*time.Millisecond))
	start := time.Now()
	_, err = c.RWMutex(name).TryRLock(ctx)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated, "after %v", time.Since(start))
}

// TestReplicaSyncOffAddsNoTimeout: WithReplicaSync(0, timeout) is replica
// sync off ("Default: off (replicas = 0)"): no WAIT is sent, so nothing
// should wait for one. Yet the timeout was kept and added to every Redlock
// master's attempt bound (and to the watchdog's renewal bound): with a
// frozen master among three, a Redlock on Clients made
// WithReplicaSync(0, 2s) — replica sync switched off by configuration —
// waited 2s for the frozen master in every round, longer than its 1s
// lease, and never got the lock the two live masters grant at once. Found
// by a reviewer.
func TestReplicaSyncOffAddsNoTimeout(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	clients := redlockClients(t, servers, redlatch.WithReplicaSync(0, 2*time.Second))
	servers[2].Stop(t)
	defer servers[2].Cont(t)
	r := redlatch.NewRedlock(name, clients, redlatch.WithLease(time.Second))
	start := time.Now()
	ok, err := r.TryLock(ctx)
	took := time.Since(start)
	require.NoError(t, err, "after %v", took)
	require.True(t, ok)
	require.Less(t, took, 500*time.Millisecond)
	require.NoError(t, r.Unlock(ctx))
}

// waitRoundTrips counts the WAITs sent on their own (a round trip of
// their own) and those pipelined behind a script.
type waitRoundTrips struct {
	passHook
	alone, piped atomic.Int32
}

func (h *waitRoundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "wait" {
			h.alone.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (h *waitRoundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if cmd.Name() == "wait" {
				h.piped.Add(1)
			}
		}
		return next(ctx, cmds)
	}
}

// TestReplicaSyncNoReadTimeoutOneRoundTrip: README: the script and WAIT are
// pipelined in one round trip unless the sync timeout does not fit within
// the client's ReadTimeout. A client without a read timeout
// (ReadTimeout: -1, "no timeout (block indefinitely)", which go-redis
// stores as 0) has room for any WAIT; runOnWithWait read that 0 as a
// read timeout of nothing, and sent every acquisition in two round trips
// on a pinned connection. Found by a reviewer.
func TestReplicaSyncNoReadTimeoutOneRoundTrip(t *testing.T) {
	master, _, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	opt := master.Options()
	opt.ReadTimeout = -1
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { _ = rdb.Close() })
	hook := &waitRoundTrips{}
	rdb.AddHook(hook)
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, time.Second))
	m := c.Mutex(redistest.UniqueName(t))
	for i := 0; i < 2; i++ { // the first caches the script (NOSCRIPT, then EVAL)
		hook.alone.Store(0)
		hook.piped.Store(0)
		ok, err := m.TryLock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, m.Unlock(ctx))
	}
	require.EqualValues(t, 1, hook.piped.Load()+hook.alone.Load(), "one WAIT")
	require.EqualValues(t, 0, hook.alone.Load(), "WAIT sent in a round trip of its own")
}

// TestReplicaSyncRenewalOneRoundTrip: README: every watchdog renewal is
// followed by WAIT in the same round trip. The renewals sent their WAIT in
// a round trip of its own after the pipeline of scripts. (Found by a
// reviewer.)
func TestReplicaSyncRenewalOneRoundTrip(t *testing.T) {
	master, _, _ := replicaPair(t)
	ctx := ctxT(t, 20*time.Second)
	rdb := redis.NewClient(master.Options()) // ReadTimeout 2s: a 200ms WAIT fits
	t.Cleanup(func() { _ = rdb.Close() })
	hook := &waitRoundTrips{}
	rdb.AddHook(hook)
	c := redlatch.New(rdb, redlatch.WithReplicaSync(1, 200*time.Millisecond),
		redlatch.WithWatchdogTimeout(900*time.Millisecond)) // renewals every 300ms
	t.Cleanup(func() { _ = c.Close() })
	m := c.Mutex(redistest.UniqueName(t))
	require.NoError(t, m.Lock(ctx))
	hook.alone.Store(0)
	hook.piped.Store(0)
	time.Sleep(1100 * time.Millisecond) // 3 renewals
	requireOpen(t, m.Lost(), "lost while replicated")
	require.NoError(t, m.Unlock(ctx))
	require.GreaterOrEqual(t, hook.piped.Load(), int32(3), "renewals followed by WAIT")
	require.Zero(t, hook.alone.Load(), "a renewal's WAIT sent in a round trip of its own")
}

// TestReplicaSyncRefusedEverywhere: with the replica frozen, every
// primitive's acquisition (first take and re-entry, blocking and not, a
// FairMutex grant claimed after a wait) fails with ErrNotReplicated
// (matching ErrNotObtained), without spinning, and leaves nothing held.
func TestReplicaSyncRefusedEverywhere(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 60*time.Second)
	opt := master.Options()
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { _ = rdb.Close() })
	rc := &redistest.RequestCounter{}
	rdb.AddHook(rc)
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, 200*time.Millisecond))
	plain := newClientOn(t, master.Client(t))
	name := redistest.UniqueName(t)

	// Holds taken while the replica is healthy, for the re-entries.
	re := c.ReentrantMutex(name + "-re")
	require.NoError(t, re.Lock(ctx))
	fre := c.FairMutex(name + "-fre")
	require.NoError(t, fre.Lock(ctx))
	rwre := c.RWMutex(name + "-rwre")
	require.NoError(t, rwre.RLock(ctx))
	down := c.RWMutex(name + "-down")
	require.NoError(t, down.Lock(ctx))
	wre := c.RWMutex(name + "-wre")
	require.NoError(t, wre.Lock(ctx))
	semre := c.Semaphore(name+"-semre", 3)
	require.NoError(t, semre.Acquire(ctx, 1))

	// Two replicas asked for, one live: refused, nothing left.
	two := newClient(t, serverBackend(master), redlatch.WithReplicaSync(2, 100*time.Millisecond))
	err := two.Mutex(name).Lock(ctx)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated)
	require.Contains(t, err.Error(), "1 of 2 replicas")
	require.EqualValues(t, 0, master.Client(t).Exists(ctx, lockKey(name)).Val())

	replica.Stop(t)
	defer replica.Cont(t)
	check := func(what string, err error) {
		t.Helper()
		require.ErrorIs(t, err, redlatch.ErrNotReplicated, what)
		require.ErrorIs(t, err, redlatch.ErrNotObtained, what)
	}
	counted := func(what string, f func() error) {
		t.Helper()
		before := rc.N.Load()
		start := time.Now()
		err := f()
		check(what, err)
		n := rc.N.Load() - before
		t.Logf("%s: %d requests, %v: %v", what, n, time.Since(start), err)
		require.Less(t, time.Since(start), 2*time.Second, what)
		require.LessOrEqual(t, n, int64(8), "%s spun", what)
	}
	counted("Mutex.Lock", func() error { return c.Mutex(name).Lock(ctx) })
	counted("ReentrantMutex.Lock", func() error { return c.ReentrantMutex(name).Lock(ctx) })
	counted("ReentrantMutex re-entry", func() error { return re.Lock(ctx) })
	counted("FairMutex.Lock", func() error { return c.FairMutex(name).Lock(ctx) })
	counted("FairMutex re-entry", func() error { return fre.Lock(ctx) })
	counted("RWMutex.Lock", func() error { return c.RWMutex(name).Lock(ctx) })
	counted("RWMutex.RLock", func() error { return c.RWMutex(name).RLock(ctx) })
	counted("RWMutex.RLock re-entry", func() error { return rwre.RLock(ctx) })
	counted("Semaphore.Acquire", func() error { return c.Semaphore(name, 2).Acquire(ctx, 2) })
	counted("RWMutex downgrade", func() error { return down.RLock(ctx) })
	counted("RWMutex write re-entry", func() error { return wre.Lock(ctx) })
	counted("Semaphore more permits", func() error { return semre.Acquire(ctx, 2) })

	// Nothing held but the earlier holds, with their counts unchanged.
	mc := master.Client(t)
	for _, k := range []string{lockKey(name), "{" + name + "}:fair", "{" + name + "}:rw"} {
		require.EqualValues(t, 0, mc.Exists(ctx, k).Val(), "%s left held", k)
	}
	ok, err := plain.Semaphore(name, 2).TryAcquire(ctx, 2)
	require.NoError(t, err)
	require.True(t, ok, "a permit left taken")
	n, err := re.HoldCount(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, n, "re-entry left counted in Redis")
	n, err = fre.HoldCount(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, n, "fair re-entry left counted in Redis")
	av, err := c.Semaphore(name+"-semre", 3).Available(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 2, av, "the refused permits returned, the held one kept")
	for _, k := range []string{name + "-down", name + "-wre"} {
		h := mc.HGetAll(ctx, "{"+k+"}:rw").Val()
		require.Equal(t, "1", h["wc"], "%s: the write hold kept, counted once: %v", k, h)
		for f := range h {
			require.False(t, strings.HasPrefix(f, "rc"), "%s: a refused read hold left: %v", k, h)
		}
	}
	require.Equal(t, "1", mc.HGet(ctx, "{"+name+"-fre}:fair", "c").Val())
	for f, v := range mc.HGetAll(ctx, "{"+name+"-rwre}:rw").Val() {
		if strings.HasPrefix(f, "rc:") {
			require.Equal(t, "1", v, "read re-entry left counted")
		}
	}
}

// TestReplicaSyncRefusedAfterWait: a blocking acquisition that waited for
// another owner's hold, then was woken (a FairMutex grant, a writer's turn, a
// permit returned), fails with ErrNotReplicated when its claim is not
// replicated, and withdraws everything: the lock is free for the next
// owner at once.
func TestReplicaSyncRefusedAfterWait(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 60*time.Second)
	c := newClient(t, serverBackend(master), redlatch.WithReplicaSync(1, 200*time.Millisecond))
	plain := newClientOn(t, master.Client(t))
	name := redistest.UniqueName(t)

	type kind struct {
		name   string
		hold   func() error
		free   func() error
		wait   func(context.Context) error
		retake func() (bool, error)
	}
	pf, pr, ps, pm := plain.FairMutex(name), plain.RWMutex(name), plain.Semaphore(name, 1), plain.Mutex(name)
	kinds := []kind{
		{"FairMutex", func() error { return pf.Lock(ctx) }, func() error { return pf.Unlock(ctx) },
			c.FairMutex(name).Lock, func() (bool, error) { return plain.FairMutex(name).TryLock(ctx) }},
		{"RWMutex", func() error { return pr.RLock(ctx) }, func() error { return pr.RUnlock(ctx) },
			c.RWMutex(name).Lock, func() (bool, error) { return plain.RWMutex(name).TryLock(ctx) }},
		{"Semaphore", func() error { return ps.Acquire(ctx, 1) }, func() error { return ps.Release(ctx, 1) },
			func(ctx context.Context) error { return c.Semaphore(name, 1).Acquire(ctx, 1) },
			func() (bool, error) { return plain.Semaphore(name, 1).TryAcquire(ctx, 1) }},
		{"Mutex", func() error { return pm.Lock(ctx) }, func() error { return pm.Unlock(ctx) },
			c.Mutex(name).Lock, func() (bool, error) { return plain.Mutex(name).TryLock(ctx) }},
	}
	replica.Stop(t)
	defer replica.Cont(t)
	for _, k := range kinds {
		require.NoError(t, k.hold(), k.name)
		done := make(chan error, 1)
		go func() { done <- k.wait(ctx) }()
		time.Sleep(700 * time.Millisecond) // queued, asleep
		select {
		case err := <-done:
			t.Fatalf("%s: wait ended early: %v", k.name, err)
		default:
		}
		require.NoError(t, k.free(), k.name)
		select {
		case err := <-done:
			require.ErrorIs(t, err, redlatch.ErrNotReplicated, k.name)
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: wait did not end", k.name)
		}
		ok, err := k.retake()
		require.NoError(t, err, k.name)
		require.True(t, ok, "%s: left held or queued", k.name)
	}
}

// TestReplicaSyncRenewalsLostEverywhere: holds of every kind taken while the
// replica was healthy (the reentrant ones twice) are reported lost once
// their unreplicated renewals have let their local deadlines pass, and every
// release of a lost hold reports ErrNotHeld, as README "Replica-synced
// acquires" and Unlock's contract say ("or the lease ran out"). The master
// still has such a hold (its unreplicated renewals extended it there): the
// first Unlock of a ReentrantMutex held twice found the count at 2,
// decremented it and returned nil for a hold Lost had reported lost.
func TestReplicaSyncRenewalsLostEverywhere(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 30*time.Second)
	timeout := 900 * time.Millisecond
	c := newClient(t, serverBackend(master), redlatch.WithReplicaSync(1, 200*time.Millisecond), redlatch.WithWatchdogTimeout(timeout))
	name := redistest.UniqueName(t)
	re := c.ReentrantMutex(name + "-re")
	f := c.FairMutex(name + "-f")
	rw := c.RWMutex(name + "-rw")
	w := c.RWMutex(name + "-w")
	for i := 0; i < 2; i++ {
		require.NoError(t, re.Lock(ctx))
		require.NoError(t, f.Lock(ctx))
		require.NoError(t, rw.RLock(ctx))
		require.NoError(t, w.Lock(ctx))
	}
	s := c.Semaphore(name+"-s", 3)
	require.NoError(t, s.Acquire(ctx, 2))
	chans := map[string]<-chan struct{}{"re": re.Lost(), "fair": f.Lost(), "rlock": rw.RLost(), "wlock": w.Lost(), "sem": s.Lost()}
	replica.Stop(t)
	defer replica.Cont(t)
	for k, ch := range chans {
		requireClosedWithin(t, ch, 2*timeout+time.Second, k+": not lost with unreplicated renewals")
	}
	for i := 1; i <= 2; i++ {
		require.ErrorIs(t, re.Unlock(ctx), redlatch.ErrNotHeld, "ReentrantMutex Unlock %d of a lost hold", i)
		require.ErrorIs(t, f.Unlock(ctx), redlatch.ErrNotHeld, "FairMutex Unlock %d of a lost hold", i)
		require.ErrorIs(t, rw.RUnlock(ctx), redlatch.ErrNotHeld, "RUnlock %d of a lost hold", i)
		require.ErrorIs(t, w.Unlock(ctx), redlatch.ErrNotHeld, "RWMutex Unlock %d of a lost hold", i)
	}
	require.ErrorIs(t, s.Release(ctx, 2), redlatch.ErrNotHeld)
	// Each Lock had its Unlock: nothing is left held on the master.
	mc := master.Client(t)
	for _, k := range []string{lockKey(name + "-re"), "{" + name + "-f}:fair", "{" + name + "-rw}:rw", "{" + name + "-w}:rw"} {
		require.EqualValues(t, 0, mc.Exists(ctx, k).Val(), "%s left held", k)
	}
}

// TestReplicaSyncRetakeAfterLocalLoss: a reentrant handle (every kind) held
// twice by two goroutines sharing it loses its hold locally (unreplicated
// renewals) while the master still counts both holds. One Unlock reports
// ErrNotHeld (the count goes to 1) and its goroutine takes the lock again:
// the master re-enters the same hold (count 2). The handle starts afresh
// (README: the other goroutine's Unlock counts against the new hold), but
// must count what Redis counts: the hold stays the handle's, renewed, its
// Lost open, until the last Unlock releases it. The handle counted one hold:
// the next Unlock stopped the renewals with the count at 1 in Redis, and the
// lock expired under its holder with Lost never closed.
func TestReplicaSyncRetakeAfterLocalLoss(t *testing.T) {
	master, replica, _ := replicaPair(t)
	ctx := ctxT(t, 30*time.Second)
	timeout := 900 * time.Millisecond
	c := newClient(t, serverBackend(master), redlatch.WithReplicaSync(1, 200*time.Millisecond), redlatch.WithWatchdogTimeout(timeout))
	name := redistest.UniqueName(t)
	type kind struct {
		name string
		key  string
		h    lossHandle
	}
	kinds := []kind{
		{"ReentrantMutex", lockKey(name + "-re"), c.ReentrantMutex(name + "-re")},
		{"FairMutex", "{" + name + "-f}:fair", c.FairMutex(name + "-f")},
		{"RWMutex", "{" + name + "-w}:rw", c.RWMutex(name + "-w")},
		{"RWMutex readers", "{" + name + "-r}:rw", readers{c.RWMutex(name + "-r")}},
	}
	for _, k := range kinds {
		require.NoError(t, k.h.Lock(ctx), k.name) // goroutine A
		require.NoError(t, k.h.Lock(ctx), k.name) // goroutine B
	}
	replica.Stop(t)
	for _, k := range kinds {
		requireClosedWithin(t, k.h.Lost(), 2*timeout+time.Second, k.name+": not lost with unreplicated renewals")
	}
	replica.Cont(t)
	waitInSync(t, master, replica)
	mc := master.Client(t)

	lost := map[string]<-chan struct{}{}
	for _, k := range kinds {
		require.ErrorIs(t, k.h.Unlock(ctx), redlatch.ErrNotHeld, "%s: A's Unlock of the lost hold", k.name)
		require.NoError(t, k.h.Lock(ctx), "%s: A takes the lock again", k.name)
		lost[k.name] = k.h.Lost()
		require.NoError(t, k.h.Unlock(ctx), "%s: B's Unlock, counted against the new hold", k.name)
	}
	// A's new holds: still the handle's, renewed past their lease.
	time.Sleep(3 * timeout)
	for _, k := range kinds {
		require.EqualValues(t, 1, mc.Exists(ctx, k.key).Val(), "%s: A's hold expired unrenewed", k.name)
		select {
		case <-lost[k.name]:
			t.Fatalf("%s: A's new hold reported lost", k.name)
		default:
		}
		require.NoError(t, k.h.Unlock(ctx), "%s: A's Unlock of its new hold", k.name)
		require.EqualValues(t, 0, mc.Exists(ctx, k.key).Val(), "%s left held", k.name)
	}
}

// TestReplicaSyncRedlock: a Redlock over three masters, each with a replica
// and a Client WithReplicaSync, is taken while the replicas are healthy;
// once two replicas freeze, the unreplicated renewals on their masters lose
// those holds, the quorum is lost, and Do's context is cancelled with
// ErrLost (Do returns it); a new Lock is refused with ErrNotReplicated at
// once and leaves nothing held. (An attempt was cut at its node timeout
// before its WAIT answered, which the server may do up to 100ms after the
// WAIT's own timeout, and counted as a master with an unknown outcome, not
// as one whose replicas did not acknowledge: the Lock retried for 1-13s.)
func TestReplicaSyncRedlock(t *testing.T) {
	ctx := ctxT(t, 40*time.Second)
	var clients []*redlatch.Client
	var masters, replicas []*redistest.Server
	for range 3 {
		m, r, _ := replicaPair(t)
		masters, replicas = append(masters, m), append(replicas, r)
		c := redlatch.New(m.Client(t), redlatch.WithReplicaSync(1, 200*time.Millisecond),
			redlatch.WithWatchdogTimeout(900*time.Millisecond))
		t.Cleanup(func() { _ = c.Close() })
		clients = append(clients, c)
	}
	name := redistest.UniqueName(t)
	rl := redlatch.NewRedlock(name, clients)
	started := make(chan struct{})
	done := make(chan error, 1)
	var cause error
	go func() {
		done <- redlatch.Do(ctx, rl, func(ctx context.Context) error {
			close(started)
			<-ctx.Done()
			cause = context.Cause(ctx)
			return ctx.Err()
		})
	}()
	<-started
	for _, r := range replicas[:2] {
		r.Stop(t)
		defer r.Cont(t)
	}
	select {
	case err := <-done:
		require.ErrorIs(t, err, redlatch.ErrLost)
		require.ErrorIs(t, cause, redlatch.ErrLost)
	case <-time.After(5 * time.Second):
		t.Fatal("Do did not end after the quorum was lost")
	}
	start := time.Now()
	err := redlatch.NewRedlock(name, clients).Lock(ctx)
	require.ErrorIs(t, err, redlatch.ErrNotReplicated)
	require.Less(t, time.Since(start), 2*time.Second, "Lock waited on")
	for i, m := range masters {
		require.EqualValues(t, 0, m.Client(t).Exists(ctx, lockKey(name)).Val(), "master %d: left held", i)
	}
}

// TestReplicaSyncAskHonoursContextOnDefaultOptions: while a Mutex's slot
// migrates, its old master answers the replica-synced acquisition with
// -ASK, and runSynced sends the script and WAIT to the importing node on a
// temporary client of its own. On a cluster client with
// ContextTimeoutEnabled off (go-redis's default) that client must end its
// reads with the call's ctx, as every other redlatch call does: with the
// importing node frozen, a TryLock with a 300ms ctx must return by its ctx
// and its undo's bound (2s), not after the ReadTimeout (5s). The undo, a
// script sent through the cluster client, is redirected (-ASK) too: the
// cluster client sends ASKING and the script in a pipeline of the importing
// node's client, whose deadlineHook left it unrouted (another 5s).
func TestReplicaSyncAskHonoursContextOnDefaultOptions(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 30*time.Second)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	to := cl.Servers[2]

	// The lock is held (its hash and fence key exist) by another Client.
	plain := newClientOn(t, cl.Client(t))
	require.NoError(t, plain.Mutex(name).Lock(ctx))

	rdb := cl.DefaultOptionsClient(t)
	c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, 50*time.Millisecond))
	m := c.Mutex(name)
	ok, err := m.TryLock(ctx) // the slot map loaded, the script cached
	require.NoError(t, err)
	require.False(t, ok)
	// go-redis's table of commands loaded (COMMAND, which the cluster
	// client sends on the call's ctx to a node it picks, the frozen one
	// maybe) and the publish command checked: the first calls of an
	// application, before the freeze.
	require.NoError(t, rdb.Ping(ctx).Err())
	require.ErrorIs(t, c.Mutex(redistest.UniqueName(t)).Lock(ctx), redlatch.ErrNotReplicated, "taken and released")

	// The migration has moved the lock's keys, not yet the slot: the old
	// master sends the acquisition to the new one (-ASK).
	cl.StartMigration(t, 2, lockKey(name), "{"+name+"}:fence")
	ok, err = m.TryLock(ctx)
	require.NoError(t, err, "run on the importing node, which has the lock")
	require.False(t, ok)

	to.Stop(t)
	t.Cleanup(func() { to.Cont(t) })
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	ok, err = m.TryLock(cctx)
	took := time.Since(start)
	t.Logf("TryLock took %v: %v", took, err)
	require.False(t, ok)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	// 300ms, and the undo of the unanswered attempt (bounded by 2s).
	require.Less(t, took, 3*time.Second, "the acquisition on the frozen importing node waited for the ReadTimeout")
}

// TestReplicaSyncRidesOutSlotMigration: under WithReplicaSync the script
// and its WAIT go straight to the master of the lock's slot (runSynced),
// past the cluster client's hook that sends a script refused with TRYAGAIN
// again (see TestLockAndUnlockRideOutSlotMigration). While the slot of a
// held lock migrates, its fence key moved already and its hash not yet, the
// source refuses the waiter's script with TRYAGAIN (one of its keys is
// missing there): a Lock returned that TRYAGAIN at once, where a Client
// without replica sync waits for the slot to move and the holder to
// release.
func TestReplicaSyncRidesOutSlotMigration(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	// A replica of master 2, where the lock's slot moves to.
	cl.AddReplica(t, lockKey(nameOn(t, cl, 2, redistest.UniqueName(t)+"-r")))
	c := newClientOn(t, cl.Client(t), redlatch.WithReplicaSync(1, time.Second))
	plain := newClientOn(t, cl.Client(t))

	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	holder := plain.Mutex(name)
	require.NoError(t, holder.Lock(ctx))
	cl.StartMigration(t, 2, "{"+name+"}:fence")
	m := c.Mutex(name)
	done := make(chan error, 1)
	go func() { done <- m.Lock(ctx) }()
	time.Sleep(500 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("Lock returned while the lock was held and its slot migrated: %v", err)
	default:
	}
	cl.MoveSlot(t, redistest.KeySlot(lockKey(name)), 2)
	require.NoError(t, holder.Unlock(ctx))
	select {
	case err := <-done:
		require.NoError(t, err, "Lock after its slot migrated")
	case <-time.After(20 * time.Second):
		t.Fatal("Lock still waiting after the slot moved and the holder released")
	}
	require.Positive(t, m.Token())
	require.NoError(t, m.Unlock(ctx))
}

// TestReplicaSyncRidesOutFreeLockMigration: while the slot of a free lock
// migrates (its keys, none of which exist, count as moved), the old master
// answers the replica-synced acquisition with -ASK and the importing one,
// after ASKING, with TRYAGAIN (a script naming several keys of an importing
// slot, some missing). Without replica sync such a Lock waits for the slot
// to move (TestLockAndUnlockRideOutSlotMigration); README: under
// WithReplicaSync too, for up to 5s. runSynced counted each -ASK of the
// ASK/TRYAGAIN cycle as a redirect and, after redirectAttempts of them
// (about 300ms), returned the raw ASK reply.
//
// Pinned: with a replica timeout that does not fit within the read timeout
// (2s each), the script and WAIT go one after the other on a pinned
// connection (see runOnWithWait), where the ASKING went alone before the
// script: go-redis sends a command refused with TRYAGAIN again by itself
// (MaxRetries), without the ASKING, and the importing master answered it
// with -MOVED back to the old master; after redirectAttempts of them the
// Lock failed with the raw MOVED reply.
func TestReplicaSyncRidesOutFreeLockMigration(t *testing.T) {
	t.Parallel() // see TestMain
	for _, tc := range []struct {
		name    string
		timeout time.Duration
	}{{"Piped", 50 * time.Millisecond}, {"Pinned", 2 * time.Second}} {
		t.Run(tc.name, func(t *testing.T) {
			cl := redistest.NewCluster(t, 3)
			ctx := ctxT(t, 60*time.Second)
			cl.AddReplica(t, lockKey(nameOn(t, cl, 2, redistest.UniqueName(t)+"-r")))
			require.Equal(t, 2*time.Second, cl.Options().ReadTimeout)
			c := newClientOn(t, cl.Client(t), redlatch.WithReplicaSync(1, tc.timeout))

			name := nameOn(t, cl, 1, redistest.UniqueName(t))
			m := c.Mutex(name)
			cl.StartMigration(t, 2, lockKey(name))
			done := make(chan error, 1)
			go func() { done <- m.Lock(ctx) }()
			time.Sleep(1500 * time.Millisecond)
			select {
			case err := <-done:
				t.Fatalf("Lock returned while its slot migrated: %v", err)
			default:
			}
			cl.MoveSlot(t, redistest.KeySlot(lockKey(name)), 2)
			select {
			case err := <-done:
				require.NoError(t, err, "Lock after its slot migrated")
			case <-time.After(20 * time.Second):
				t.Fatal("Lock still waiting after the slot moved")
			}
			require.Positive(t, m.Token())
			require.NoError(t, m.Unlock(ctx))
		})
	}
}

// TestReplicaSyncRenewalBatchSplitByMigration is
// TestRenewalBatchSplitByMigration under WithReplicaSync, whose renewals go
// another way: each master's batches and one WAIT on a connection of that
// master (renewSyncedOn). While the slot of a Mutex and a Semaphore of one
// name migrates, the lock's keys moved and the permits' not, the source
// refuses with TRYAGAIN the batch naming both keys, at every period: both
// valid holds were reported lost at their deadline, the lock and permits
// expiring under their holders. Each key alone is served, the lock's on
// the importing master after ASKING, followed by WAIT there (its own
// replica acknowledging).
func TestReplicaSyncRenewalBatchSplitByMigration(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	// A replica of master 1, where the slot is, and of master 2, where the
	// lock's keys move to: WAIT must be acknowledged on both.
	cl.AddReplica(t, lockKey(nameOn(t, cl, 1, redistest.UniqueName(t)+"-r")))
	cl.AddReplica(t, lockKey(nameOn(t, cl, 2, redistest.UniqueName(t)+"-r")))
	c := newClientOn(t, cl.Client(t), redlatch.WithWatchdogTimeout(600*time.Millisecond),
		redlatch.WithReplicaSync(1, time.Second))
	m, s, name := holdThroughMigration(t, ctx, cl, c)

	// The permits' key moves too: the source answers the batch, every key
	// of it moved, with -ASK (not TRYAGAIN). Renewed key by key, following
	// ASK, as the cluster client does without replica sync.
	cl.StartMigration(t, 2, "{"+name+"}:sem")
	requireHeldThroughMigration(t, ctx, cl, m, s, "once every key of its slot moved", lockKey(name), "{"+name+"}:sem")
}

// TestReplicaSyncKeyByKeyWaitsDoNotStarveSourceHolds: under WithReplicaSync
// each master's renewals end with one WAIT, and its results are applied as
// soon as it answered. A batch of a migrating slot refused with TRYAGAIN is
// renewed key by key, each moved key on the importing master followed by a
// WAIT of its own, at most 8 at once: with a slow (here: no) replica there,
// each takes the whole replica timeout, and 99 moved keys took 13 of them.
// The Semaphore's permits, still on the source master, and a Mutex of
// another slot of it, both renewed there and acknowledged by its replica,
// waited for all of them, past their deadlines, and were reported lost.
func TestReplicaSyncKeyByKeyWaitsDoNotStarveSourceHolds(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 30*time.Second)
	cl.AddReplica(t, lockKey(nameOn(t, cl, 1, redistest.UniqueName(t)+"-r")))
	// Replica timeout 0.3 of the renewal period (400 ms).
	c := newClientOn(t, cl.Client(t), redlatch.WithWatchdogTimeout(1200*time.Millisecond),
		redlatch.WithReplicaSync(1, 120*time.Millisecond))
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	slot := redistest.KeySlot(lockKey(name))
	moved := []string{lockKey(name)}
	var held []*redlatch.Mutex
	for n := 0; len(moved) < 99; n++ {
		other := fmt.Sprintf("%s-%d", name, n)
		if redistest.KeySlot(lockKey(other)) == slot {
			moved = append(moved, lockKey(other))
		}
	}
	for _, k := range moved {
		m := c.Mutex(strings.TrimSuffix(strings.TrimPrefix(k, "{"), "}:lock"))
		require.NoError(t, m.Lock(ctx))
		held = append(held, m)
	}
	s := c.Semaphore(name, 2)
	require.NoError(t, s.Acquire(ctx, 1))
	other := c.Mutex(nameOn(t, cl, 1, redistest.UniqueName(t)+"-o")) // another slot of master 1
	require.NoError(t, other.Lock(ctx))

	// The locks' keys move to master 2, which has no replica: their WAITs
	// there take the replica timeout, and they are lost (not replicated).
	cl.StartMigration(t, 2, moved...)
	time.Sleep(2400 * time.Millisecond) // two leases: only renewals keep them
	requireOpen(t, other.Lost(), "a hold of another slot of the source master was lost")
	requireOpen(t, s.Lost(), "the Semaphore permits, renewed on the source master, were lost")
	requireClosedWithin(t, held[0].Lost(), time.Second, "a lock on the importing master, not replicated, was kept")
}

// stableAfterTryAgainHook, armed, ends a migrating slot's migration
// (CLUSTER SETSLOT STABLE on nodes) right after its master refused a
// script with TRYAGAIN, before the script is sent again: a migration
// cancelled (or finished) between the two sends. It is given to the
// master's node client twice: before New (OnNewNode), where it sees the
// script and its WAIT once redlatch's deadlineHook has sent them, and after
// New, inside that hook, where it sees what the hook sends on through the
// node client itself (the routed calls go through a clone that has not
// got it): a script sent again alone.
type stableAfterTryAgainHook struct {
	passHook
	armed atomic.Bool
	fired atomic.Bool
	slot  int
	nodes []*redis.Client
}

func (h *stableAfterTryAgainHook) end() {
	if h.armed.Load() && h.fired.CompareAndSwap(false, true) {
		for _, n := range h.nodes {
			_ = n.Do(context.Background(), "CLUSTER", "SETSLOT", h.slot, "STABLE").Err()
		}
	}
}

func (h *stableAfterTryAgainHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) == 1 && cmds[0].Name() == "evalsha" {
			h.end() // sent again after its refusal
		}
		err := next(ctx, cmds)
		if e := cmds[0].Err(); e != nil && strings.HasPrefix(e.Error(), "TRYAGAIN") {
			h.end()
		}
		return err
	}
}

// waitReplicaAcked waits until master's replica has acknowledged every
// write of master's replication stream.
func waitReplicaAcked(t *testing.T, master *redistest.Server) {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	m := master.Client(t)
	own := regexp.MustCompile(`master_repl_offset:(\d+)`)
	acked := regexp.MustCompile(`slave0:.*offset=(\d+)`)
	require.Eventually(t, func() bool {
		info, err := m.Info(ctx, "replication").Result()
		if err != nil {
			return false
		}
		a, b := own.FindStringSubmatch(info), acked.FindStringSubmatch(info)
		if a == nil || b == nil {
			return false
		}
		x, _ := strconv.ParseInt(a[1], 10, 64)
		y, _ := strconv.ParseInt(b[1], 10, 64)
		return x == y
	}, 15*time.Second, 20*time.Millisecond, "replica never acknowledged the master's writes")
}

// TestReplicaSyncScriptResentWithoutItsWait: under WithReplicaSync on a
// *redis.ClusterClient with ContextTimeoutEnabled off, an acquisition's
// script and WAIT go to the master in one pipeline, routed through a clone
// of its node client (routeNodePipeline). The master refuses the script
// with TRYAGAIN (its slot migrates, one of the lock's keys is missing) and
// answers the WAIT at once, for the connection's earlier writes, all
// replicated. routeNodePipeline sent the refused script again by itself,
// without a WAIT: once the slot stopped migrating, it took the lock, and
// the acquisition reported the stale WAIT's count: the Lock succeeded
// "replicated" while the only replica was frozen and never got the hold.
// (Found by a reviewer.)
func TestReplicaSyncScriptResentWithoutItsWait(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 60*time.Second)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	master, replica := cl.AddReplica(t, lockKey(name))

	cc := cl.DefaultOptionsClient(t)
	hook := &stableAfterTryAgainHook{slot: redistest.KeySlot(lockKey(name)),
		nodes: []*redis.Client{cl.Servers[1].Client(t), cl.Servers[2].Client(t)}}
	cc.OnNewNode(func(n *redis.Client) { n.AddHook(hook) })
	c := newClientOn(t, cc, redlatch.WithReplicaSync(1, 300*time.Millisecond))

	// The lock's fence key exists, its hash does not.
	m := c.Mutex(name)
	require.NoError(t, m.Lock(ctx))
	require.NoError(t, m.Unlock(ctx))
	mc := master.Client(t)
	require.EqualValues(t, 1, mc.Exists(ctx, "{"+name+"}:fence").Val())
	node, err := cc.MasterForKey(ctx, lockKey(name))
	require.NoError(t, err)
	node.AddHook(hook)

	cl.StartMigration(t, 2, lockKey(name)) // moves nothing: the hash is gone
	waitReplicaAcked(t, master)
	replica.Stop(t)
	defer replica.Cont(t)

	hook.armed.Store(true)
	err = c.Mutex(name).Lock(ctxT(t, 5*time.Second))
	require.True(t, hook.fired.Load(), "the slot's migration never ended")
	require.ErrorIs(t, err, redlatch.ErrNotReplicated, "a Lock whose only replica is frozen")
	require.EqualValues(t, 0, mc.Exists(ctx, lockKey(name)).Val(), "nothing left held on the master")
}

// TestReplicaSyncHugeTimeoutWaitsForCtx: WithReplicaSync(1, math.MaxInt64)
// ("wait for the replica, however long") is accepted, and a WAIT timeout
// above the client's ReadTimeout goes on a pinned connection with its own
// read deadline: with no replica to acknowledge, Lock waits until its ctx
// ends and fails as a wait (ErrNotObtained and ctx.Err()), as it does with
// a timeout of an hour. timeout+waitMargin overflowed to a negative
// Duration, which chose the pipelined path, and go-redis's WAIT read
// deadline (its timeout + 10s) overflowed too: Lock returned a bare
// "i/o timeout" at the ReadTimeout, long before its ctx ended. (Found by a
// reviewer.)
func TestReplicaSyncHugeTimeoutWaitsForCtx(t *testing.T) {
	master := redistest.NewServer(t) // no replica: WAIT 1 never succeeds
	for _, timeout := range []time.Duration{time.Hour, math.MaxInt64} {
		opt := master.Options()
		opt.ReadTimeout = 200 * time.Millisecond
		opt.MaxRetries = -1 // a read that times out fails at once
		rdb := redis.NewClient(opt)
		t.Cleanup(func() { _ = rdb.Close() })
		c := newClientOn(t, rdb, redlatch.WithReplicaSync(1, timeout))
		name := redistest.UniqueName(t)
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		start := time.Now()
		err := c.Mutex(name).Lock(ctx)
		cancel()
		require.ErrorIs(t, err, redlatch.ErrNotObtained, "timeout %v, after %v", timeout, time.Since(start))
		require.ErrorIs(t, err, context.DeadlineExceeded, "timeout %v", timeout)
		locked, err := c.Mutex(name).IsLocked(t.Context())
		require.NoError(t, err)
		require.False(t, locked, "timeout %v: nothing left held", timeout)
	}
}
