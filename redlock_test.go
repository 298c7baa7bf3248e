package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// redlockServers starts n private redis-servers.
func redlockServers(t *testing.T, n int) []*redistest.Server {
	t.Helper()
	out := make([]*redistest.Server, n)
	for i := range out {
		out[i] = redistest.NewServer(t)
	}
	return out
}

// redlockClients returns one redlatch Client per server, closed at the end
// of the test.
func redlockClients(t *testing.T, servers []*redistest.Server, opts ...redlatch.Option) []*redlatch.Client {
	t.Helper()
	out := make([]*redlatch.Client, len(servers))
	for i, s := range servers {
		c := newClientOn(t, s.Client(t), opts...)
		out[i] = c
	}
	return out
}

// deadClient returns a Client on a loopback port nobody listens on: every
// command fails at once with "connection refused".
func deadClient(t *testing.T) *redlatch.Client {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, ContextTimeoutEnabled: true,
		DialTimeout: 200 * time.Millisecond, DialerRetries: 1})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb)
	return c
}

// heldOn reports, per server, whether the lock called name exists there.
func heldOn(t *testing.T, ctx context.Context, servers []*redistest.Server, name string) []bool {
	t.Helper()
	out := make([]bool, len(servers))
	for i, s := range servers {
		n, err := s.Client(t).Exists(ctx, lockKey(name)).Result()
		require.NoError(t, err)
		out[i] = n == 1
	}
	return out
}

func TestRedlockBadInput(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = rdb.Close() })
	rdb2 := redis.NewClient(&redis.Options{Addr: "127.0.0.1:2"})
	t.Cleanup(func() { _ = rdb2.Close() })
	c1, c2 := redlatch.New(rdb), redlatch.New(rdb2)
	c1b := redlatch.New(rdb) // another Client on the same Redis client
	t.Cleanup(func() { _, _, _ = c1.Close(), c2.Close(), c1b.Close() })
	ctx := ctxT(t, 5*time.Second)
	for name, r := range map[string]*redlatch.Redlock{
		"nil clients":      redlatch.NewRedlock("x", nil),
		"no clients":       redlatch.NewRedlock("x", []*redlatch.Client{}),
		"nil client":       redlatch.NewRedlock("x", []*redlatch.Client{c1, nil}),
		"duplicate client": redlatch.NewRedlock("x", []*redlatch.Client{c1, c2, c1}),
		"duplicate redis":  redlatch.NewRedlock("x", []*redlatch.Client{c1, c2, c1b}),
		"empty name":       redlatch.NewRedlock("", []*redlatch.Client{c1, c2}),
		"zero lease":       redlatch.NewRedlock("x", []*redlatch.Client{c1, c2}, redlatch.WithLease(0)),
		"empty owner":      redlatch.NewRedlock("x", []*redlatch.Client{c1, c2}, redlatch.WithOwner("")),
	} {
		t.Run(name, func(t *testing.T) {
			require.ErrorIs(t, r.Lock(ctx), redlatch.ErrInvalidArgument)
			ok, err := r.TryLock(ctx)
			require.False(t, ok)
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
			require.ErrorIs(t, r.Unlock(ctx), redlatch.ErrInvalidArgument)
			require.Nil(t, r.Lost())
			require.Zero(t, r.Validity())
		})
	}
}

// TestRedlockMasks: over 5 masters, every mask of masters that are not free
// — unreachable (a closed port) or held by another owner, alternating by
// position — grants the lock exactly when at least 3 are free; a refused
// attempt leaves nothing behind on the free masters, a granted one holds
// on every free master and leaves the other owner's holds alone, and
// Unlock clears it everywhere.
func TestRedlockMasks(t *testing.T) {
	servers := redlockServers(t, 5)
	live := redlockClients(t, servers)
	others := redlockClients(t, servers)
	dead := make([]*redlatch.Client, 5)
	for i := range dead {
		dead[i] = deadClient(t)
	}
	ctx := ctxT(t, 60*time.Second)
	lease := 3 * time.Second
	for mask := 0; mask < 32; mask++ {
		name := fmt.Sprintf("redlock-mask-%02d", mask)
		clients := make([]*redlatch.Client, 5)
		free, busy := 0, 0
		var occupied []*redlatch.Mutex
		for i := 0; i < 5; i++ {
			switch {
			case mask&(1<<i) == 0:
				clients[i] = live[i]
				free++
			case (i+mask)%2 == 0:
				clients[i] = dead[i]
			default:
				clients[i] = live[i]
				m := others[i].Mutex(name, redlatch.WithLease(time.Minute))
				ok, err := m.TryLock(ctx)
				require.NoError(t, err)
				require.True(t, ok)
				occupied = append(occupied, m)
				busy++
			}
		}
		r := redlatch.NewRedlock(name, clients, redlatch.WithLease(lease))
		ok, err := r.TryLock(ctx)
		held := heldOn(t, ctx, servers, name)
		if free >= 3 {
			require.NoError(t, err, "mask %05b", mask)
			require.True(t, ok, "mask %05b: %d free masters", mask, free)
			require.Greater(t, r.Validity(), lease/2)
			require.NotNil(t, r.Lost())
			for i := 0; i < 5; i++ {
				require.Equal(t, mask&(1<<i) == 0 || clients[i] == live[i], held[i], "mask %05b master %d", mask, i)
			}
			require.NoError(t, r.Unlock(ctx), "mask %05b", mask)
			require.Zero(t, r.Validity())
		} else {
			require.False(t, ok, "mask %05b: %d free masters", mask, free)
			if busy > 2 {
				require.NoError(t, err, "mask %05b: contention is not an error", mask)
			} else {
				require.ErrorIs(t, err, redlatch.ErrNotObtained, "mask %05b", mask)
			}
			require.Zero(t, r.Validity())
			require.Nil(t, r.Lost())
			require.ErrorIs(t, r.Unlock(ctx), redlatch.ErrNotHeld)
		}
		// Nothing is left on the free masters; the other owner's holds stay.
		held = heldOn(t, ctx, servers, name)
		for i := 0; i < 5; i++ {
			require.Equal(t, clients[i] == live[i] && mask&(1<<i) != 0, held[i], "mask %05b master %d after", mask, i)
		}
		for _, m := range occupied {
			require.NoError(t, m.Unlock(ctx))
		}
	}
}

// TestRedlockStoppedMasters: frozen masters (SIGSTOP) cost the node
// timeout, not more: with 2 of 5 frozen the lock is granted, with a
// validity shorter by at least the time the frozen masters were waited for;
// with 3 frozen it is refused. Validity shrinks with the acquisition time.
func TestRedlockStoppedMasters(t *testing.T) {
	servers := redlockServers(t, 5)
	clients := redlockClients(t, servers)
	ctx := ctxT(t, 30*time.Second)
	lease := 4 * time.Second
	drift := lease/100 + 2*time.Millisecond
	nodeTimeout := lease / 20

	r := redlatch.NewRedlock("redlock-stopped", clients, redlatch.WithLease(lease))
	before := time.Now()
	ok, err := r.TryLock(ctx)
	took := time.Since(before)
	require.NoError(t, err)
	require.True(t, ok)
	fast := r.Validity()
	require.LessOrEqual(t, fast, lease-drift)
	require.Greater(t, fast, lease-drift-took-time.Second) // generous under load
	require.NoError(t, r.Unlock(ctx))

	servers[1].Stop(t)
	servers[3].Stop(t)
	stopped := []*redistest.Server{servers[1], servers[3]}
	t.Cleanup(func() {
		for _, s := range stopped {
			s.Cont(t)
		}
	})
	ok, err = r.TryLock(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	slow := r.Validity()
	require.LessOrEqual(t, slow, lease-drift-nodeTimeout, "the frozen masters were waited for")
	require.Less(t, slow, fast)
	require.NoError(t, r.Unlock(ctx)) // 3 of 5 confirm the release

	servers[4].Stop(t)
	stopped = append(stopped, servers[4])
	start := time.Now()
	ok, err = r.TryLock(ctx)
	require.False(t, ok)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)
	require.Less(t, time.Since(start), 2*time.Second)
	for _, s := range stopped {
		s.Cont(t)
	}
	stopped = nil
	// The frozen masters run the attempts they received late; nothing of the
	// refused attempt is left on the masters that answered.
	require.Equal(t, []bool{false, false}, heldOn(t, ctx, []*redistest.Server{servers[0], servers[2]}, "redlock-stopped"))
	// Once the late grants expire or are released, the lock is free again.
	require.NoError(t, r.Lock(ctxT(t, 10*time.Second)))
	require.NoError(t, r.Unlock(ctx))
}

// TestRedlockMutualExclusion: Redlocks of several owners, on Clients of
// their own (as in separate processes), never hold at once, and every one
// gets its turn; a Mutex of the same name on a majority of the masters
// keeps a Redlock out.
func TestRedlockMutualExclusion(t *testing.T) {
	servers := redlockServers(t, 5)
	ctx := ctxT(t, 60*time.Second)
	const workers, rounds = 3, 8
	var inside, entries atomic.Int32
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		r := redlatch.NewRedlock("redlock-mutex", redlockClients(t, servers), redlatch.WithLease(5*time.Second))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				if err := r.Lock(ctx); err != nil {
					t.Error(err)
					return
				}
				if inside.Add(1) != 1 {
					t.Error("two Redlocks held at once")
				}
				entries.Add(1)
				time.Sleep(2 * time.Millisecond)
				inside.Add(-1)
				if err := r.Unlock(ctx); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	require.EqualValues(t, workers*rounds, entries.Load())

	// Mutexes on 3 of the 5 masters exclude the Redlock, and vice versa.
	clients := redlockClients(t, servers)
	var ms []*redlatch.Mutex
	for i := 0; i < 3; i++ {
		m := clients[i].Mutex("redlock-mutex")
		require.NoError(t, m.Lock(ctx))
		ms = append(ms, m)
	}
	r := redlatch.NewRedlock("redlock-mutex", redlockClients(t, servers))
	ok, err := r.TryLock(ctx)
	require.NoError(t, err)
	require.False(t, ok)
	require.Equal(t, []bool{true, true, true, false, false}, heldOn(t, ctx, servers, "redlock-mutex"))
	for _, m := range ms {
		require.NoError(t, m.Unlock(ctx))
	}
	require.NoError(t, r.Lock(ctx))
	ok, err = clients[4].Mutex("redlock-mutex").TryLock(ctx)
	require.NoError(t, err)
	require.False(t, ok)
	require.NoError(t, r.Unlock(ctx))
}

// TestRedlockWait: a blocked Lock is woken by pub/sub at the holder's
// Unlock (well before the lease), and a wait ended by its context matches
// ErrNotObtained and ctx.Err().
func TestRedlockWait(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 30*time.Second)
	holder := redlatch.NewRedlock("redlock-wait", redlockClients(t, servers), redlatch.WithLease(20*time.Second))
	waiter := redlatch.NewRedlock("redlock-wait", redlockClients(t, servers), redlatch.WithLease(20*time.Second))
	require.NoError(t, holder.Lock(ctx))

	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	requireWaitErr(t, waiter.Lock(short), short)

	got := make(chan time.Time, 1)
	go func() {
		if err := waiter.Lock(ctx); err != nil {
			t.Error(err)
			close(got)
			return
		}
		got <- time.Now()
	}()
	time.Sleep(300 * time.Millisecond)
	require.NoError(t, holder.Unlock(ctx))
	released := time.Now()
	select {
	case at, ok := <-got:
		require.True(t, ok)
		require.Less(t, at.Sub(released), 2*time.Second, "woken by pub/sub, not by the 20s lease")
	case <-time.After(10 * time.Second):
		t.Fatal("waiter not woken")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// TestRedlockWatchdog: without WithLease the masters' watchdogs renew the
// lock; it stays held while a quorum renews (2 of 5 masters killed), and
// Lost closes once a third is gone; Unlock then reports ErrNotHeld.
func TestRedlockWatchdog(t *testing.T) {
	servers := redlockServers(t, 5)
	timeout := 900 * time.Millisecond
	clients := redlockClients(t, servers, redlatch.WithWatchdogTimeout(timeout))
	ctx := ctxT(t, 30*time.Second)
	r := redlatch.NewRedlock("redlock-watchdog", clients)
	require.NoError(t, r.Lock(ctx))
	time.Sleep(2 * timeout)
	requireOpen(t, r.Lost(), "renewed lock lost")
	require.Greater(t, r.Validity(), time.Duration(0))

	servers[0].Kill(t)
	servers[2].Kill(t)
	time.Sleep(2 * timeout)
	requireOpen(t, r.Lost(), "lock lost with a quorum still renewing")
	require.Greater(t, r.Validity(), time.Duration(0))

	servers[4].Kill(t)
	requireClosedWithin(t, r.Lost(), 2*timeout+500*time.Millisecond, "Lost after the quorum was gone")
	require.Zero(t, r.Validity())
	require.ErrorIs(t, r.Unlock(ctx), redlatch.ErrNotHeld)
}

// TestRedlockFixedLease: a WithLease hold is not renewed: Lost closes when
// the validity runs out (before the masters expire the lock), and Unlock
// reports ErrNotHeld.
func TestRedlockFixedLease(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	lease := 500 * time.Millisecond
	r := redlatch.NewRedlock("redlock-lease", redlockClients(t, servers), redlatch.WithLease(lease))
	start := time.Now()
	require.NoError(t, r.Lock(ctx))
	requireClosedWithin(t, r.Lost(), 2*lease, "Lost at the end of the validity")
	require.Less(t, time.Since(start), lease+300*time.Millisecond)
	require.Zero(t, r.Validity())
	require.ErrorIs(t, r.Unlock(ctx), redlatch.ErrNotHeld)
	// The masters expire it by themselves.
	require.Eventually(t, func() bool {
		for _, h := range heldOn(t, ctx, servers, "redlock-lease") {
			if h {
				return false
			}
		}
		return true
	}, 3*time.Second, 20*time.Millisecond)
}

// TestRedlockLostWhenSameOwnerRetakes: the Redlock case of
// TestLostWhenSameOwnerRetakes. Each master's hold is renewed and released
// by its own fencing token: a hold lost on every master while another
// handle with the same owner id takes the lock at once is reported lost,
// and its Unlock leaves the later hold alone.
func TestRedlockLostWhenSameOwnerRetakes(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	first := redlatch.NewRedlock(name, redlockClients(t, servers, redlatch.WithWatchdogTimeout(300*time.Millisecond)),
		redlatch.WithOwner("shared"))
	second := redlatch.NewRedlock(name, redlockClients(t, servers), redlatch.WithOwner("shared"))
	require.NoError(t, first.Lock(ctx))
	lost := first.Lost()
	for _, s := range servers {
		require.NoError(t, s.Client(t).Del(ctx, lockKey(name)).Err()) // first's holds end unnoticed
	}
	require.NoError(t, second.Lock(ctx))
	select {
	case <-lost:
	case <-time.After(3 * time.Second): // ten renewal periods
		t.Fatal("the lost hold was renewed through the later hold of its owner id")
	}
	require.ErrorIs(t, first.Unlock(ctx), redlatch.ErrNotHeld)
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, servers, name), "the lost hold's Unlock released the later hold")
	require.NoError(t, second.Unlock(ctx))
	require.Equal(t, []bool{false, false, false}, heldOn(t, ctx, servers, name))
}

// TestRedlockQueuedLockEndsOnClose: a second Lock on a Redlock handle
// shared by goroutines waits for the first hold's Unlock, and returns
// ErrClosed when a Client of the masters is closed meanwhile, as waits in
// progress do. Once a quorum of the Clients is closed, Lost closes.
func TestRedlockQueuedLockEndsOnClose(t *testing.T) {
	clients := redlockClients(t, redlockServers(t, 3))
	ctx := ctxT(t, 10*time.Second)
	r := redlatch.NewRedlock(redistest.UniqueName(t), clients)
	require.NoError(t, r.Lock(ctx))
	got := make(chan error, 1)
	go func() { got <- r.Lock(ctx) }()
	time.Sleep(100 * time.Millisecond) // the second Lock waits for the first hold
	require.NoError(t, clients[1].Close())
	select {
	case err := <-got:
		require.ErrorIs(t, err, redlatch.ErrClosed)
	case <-time.After(3 * time.Second):
		_ = r.Unlock(ctx)
		<-got
		t.Fatal("the queued Lock ignored Close")
	}
	// A closed Client's master no longer counts: with a second one closed,
	// a quorum is gone at once, not when the unrenewed leases run out.
	requireOpen(t, r.Lost(), "lost with a quorum of Clients open")
	require.NoError(t, clients[2].Close())
	requireClosedWithin(t, r.Lost(), time.Second, "Lost after a quorum of Clients closed")
}

// TestRedlockUnlockWithAClientClosed: a held Redlock whose masters' Clients
// are partly closed is still released on every master by Unlock (Close
// leaves the Redis clients open): the other masters' watchdogs would renew
// it for ever.
func TestRedlockUnlockWithAClientClosed(t *testing.T) {
	servers := redlockServers(t, 3)
	clients := redlockClients(t, servers, redlatch.WithWatchdogTimeout(300*time.Millisecond))
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	r := redlatch.NewRedlock(name, clients)
	require.NoError(t, r.Lock(ctx))
	require.NoError(t, clients[0].Close())
	require.NoError(t, r.Unlock(ctx))
	require.Equal(t, []bool{false, false, false}, heldOn(t, ctx, servers, name))
	require.ErrorIs(t, r.Unlock(ctx), redlatch.ErrClosed, "nothing held, a Client closed")
}

// TestRedlockClientClosedDuringLock: a master's Client closed while a Lock
// fans out (its hold may be recorded or not) never makes Lost close while
// a quorum of the other masters holds the lock. The close notification
// runs the quorum check, which must wait until every master's hold is
// recorded.
func TestRedlockClientClosedDuringLock(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 60*time.Second)
	checked := 0 // rounds whose TryLock succeeded: Lost was checked
	for i := range 60 {
		clients := make([]*redlatch.Client, len(servers))
		for j, s := range servers {
			clients[j] = redlatch.New(s.Client(t))
		}
		r := redlatch.NewRedlock(redistest.UniqueName(t), clients)
		closed := make(chan struct{})
		go func() {
			defer close(closed)
			time.Sleep(time.Duration(i%20) * 20 * time.Microsecond)
			_ = clients[0].Close()
		}()
		ok, err := r.TryLock(ctx)
		<-closed
		if err == nil && ok {
			time.Sleep(20 * time.Millisecond) // the close notification's check
			requireOpen(t, r.Lost(), "lost with two of three masters holding")
			require.NoError(t, r.Unlock(ctx))
			checked++
		}
		for _, c := range clients[1:] {
			require.NoError(t, c.Close())
		}
	}
	t.Logf("%d of 60 rounds took the lock", checked)
	require.GreaterOrEqual(t, checked, 10, "too few rounds took the lock to check Lost")
}

// TestRedlockDoCancelsOnLoss: Do's context ends with ErrLost when a held
// Redlock loses its quorum (TestDoCancelsOnLoss for the other lock types).
func TestRedlockDoCancelsOnLoss(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	r := redlatch.NewRedlock(name, redlockClients(t, servers, redlatch.WithWatchdogTimeout(300*time.Millisecond)))
	requireDoCancelsOnLoss(t, ctx, r, func() {
		for _, s := range servers {
			require.NoError(t, s.Client(t).Del(ctx, lockKey(name)).Err())
		}
	})
}

// TestRedlockWrongTypeMinorityMaster: one master of three has foreign data
// under the lock's key (WRONGTYPE), and another owner holds the lock on the
// two others. A Redlock tolerates a minority of broken masters: TryLock
// reports the contention as (false, nil), as its godoc says for "other
// owners hold the lock on so many masters that no quorum was possible", and
// Lock waits for the holder and then takes the lock on the two good masters.
// Both returned ErrWrongType at once: the WRONGTYPE of one master was
// treated as fatal although a quorum without it is possible. Found by a
// reviewer.
func TestRedlockWrongTypeMinorityMaster(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	require.NoError(t, servers[2].Client(t).Set(ctx, lockKey(name), "foreign", 0).Err())
	holders := redlockClients(t, servers[:2])
	var held []*redlatch.Mutex
	for _, c := range holders {
		m := c.Mutex(name, redlatch.WithLease(10*time.Second))
		require.NoError(t, m.Lock(ctx))
		held = append(held, m)
	}
	r := redlatch.NewRedlock(name, redlockClients(t, servers), redlatch.WithLease(10*time.Second))

	ok, err := r.TryLock(ctx)
	require.False(t, ok)
	require.NoError(t, err, "another owner holds a quorum: TryLock reports (false, nil)")

	time.AfterFunc(300*time.Millisecond, func() {
		for _, m := range held {
			_ = m.Unlock(context.Background())
		}
	})
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	start := time.Now()
	require.NoError(t, r.Lock(lctx), "Lock gave up instead of waiting for the holder")
	require.GreaterOrEqual(t, time.Since(start), 250*time.Millisecond)
	require.Equal(t, []bool{true, true}, heldOn(t, ctx, servers[:2], name))
	require.NoError(t, r.Unlock(ctx))
	require.Equal(t, []bool{false, false}, heldOn(t, ctx, servers[:2], name))

	// A majority of such masters can never grant it: that stays an error
	// at once, not a wait.
	require.NoError(t, servers[1].Client(t).Set(ctx, lockKey(name), "foreign", 0).Err())
	start = time.Now()
	require.ErrorIs(t, r.Lock(lctx), redlatch.ErrWrongType)
	require.Less(t, time.Since(start), time.Second)
	_, err = r.TryLock(ctx)
	require.ErrorIs(t, err, redlatch.ErrWrongType)
}

// taggedRedis is a go-redis client wrapped by value, as instrumentation
// wrappers do: a valid redis.UniversalClient, but not a hashable one (a
// slice field).
type taggedRedis struct {
	redis.UniversalClient
	tags []string
}

// TestRedlockWrappedRedisClients: Clients made with New from a valid
// redis.UniversalClient that is a struct value with a slice field (a
// wrapper) work as a Mutex does; NewRedlock panicked on them ("hash of
// unhashable type", from its duplicate check, which used the Redis clients
// as map keys), although bad input never panics (API.md). Found by a
// reviewer.
func TestRedlockWrappedRedisClients(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	var clients []*redlatch.Client
	for _, s := range servers {
		c := newClientOn(t, taggedRedis{UniversalClient: s.Client(t), tags: []string{"a"}})
		clients = append(clients, c)
	}
	m := clients[0].Mutex(name)
	require.NoError(t, m.Lock(ctx), "a Mutex works on such a Client")
	require.NoError(t, m.Unlock(ctx))

	var r *redlatch.Redlock
	require.NotPanics(t, func() { r = redlatch.NewRedlock(name, clients) })
	require.NoError(t, r.Lock(ctx))
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, servers, name))
	require.NoError(t, r.Unlock(ctx))
	require.Equal(t, []bool{false, false, false}, heldOn(t, ctx, servers, name))

	// The same Client twice is still refused, and so are two Clients made
	// from one wrapper value: the same master twice (a quorum of 2 of 3
	// from one Redis server; the check skipped non-comparable clients).
	require.ErrorIs(t, redlatch.NewRedlock(name, []*redlatch.Client{clients[0], clients[1], clients[0]}).Lock(ctx),
		redlatch.ErrInvalidArgument)
	w := taggedRedis{UniversalClient: servers[0].Client(t), tags: []string{"a"}}
	twice := []*redlatch.Client{redlatch.New(w), redlatch.New(w), clients[2]}
	t.Cleanup(func() { _ = twice[0].Close(); _ = twice[1].Close() })
	_, err := redlatch.NewRedlock(name, twice).TryLock(ctx)
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
}

// TestRedlockUnlockNilCtxWhileHeld: Redlock.Unlock with a nil ctx on a
// handle that holds the lock returns ErrInvalidArgument naming ctx and
// keeps the hold, as every other Unlock does. Its ctx check ran only when
// the handle held nothing: with a hold, it dropped the hold from the handle
// and the per-master release goroutines panicked in
// context.WithTimeout(nil, …), crashing the program. Found by a reviewer.
func TestRedlockUnlockNilCtxWhileHeld(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	r := redlatch.NewRedlock(name, redlockClients(t, servers), redlatch.WithLease(5*time.Second))
	require.NoError(t, r.Lock(ctx))
	var nilCtx context.Context
	err := r.Unlock(nilCtx)
	time.Sleep(100 * time.Millisecond) // a release goroutine's panic would crash the binary here
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
	require.Contains(t, err.Error(), "ctx")
	require.Equal(t, []bool{true, true, true}, heldOn(t, ctx, servers, name), "the hold must be kept")
	requireOpen(t, r.Lost(), "Lost closed by a rejected Unlock")
	require.NoError(t, r.Unlock(ctx), "the hold is still the handle's")
	require.Equal(t, []bool{false, false, false}, heldOn(t, ctx, servers, name))
}

// meteredRedis is an instrumentation wrapper by value, as in
// TestRedlockWrappedRedisClients, whose map field it updates on every
// command (under its own lock): a valid redis.UniversalClient, not
// comparable.
type meteredRedis struct {
	redis.UniversalClient
	mu    *sync.Mutex
	calls map[string]int
}

func (m meteredRedis) count(name string) {
	m.mu.Lock()
	m.calls[name]++
	m.mu.Unlock()
}

// TestRedlockWrappedClientInUse: NewRedlock over Clients whose Redis client
// is a non-comparable wrapper must not read the wrapper's shared state (a
// map or a slice's elements, which the wrapper may change at any time, under
// locks of its own): it made its duplicate key with fmt's %#v, which walks
// every map and slice the wrapper holds, racing with the wrapper's own
// writes (run with -race; without it, Go may abort the program with
// "concurrent map iteration and map write"). Found by a reviewer.
func TestRedlockWrappedClientInUse(t *testing.T) {
	var clients []*redlatch.Client
	var wrappers []meteredRedis
	for range 3 {
		rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
		t.Cleanup(func() { _ = rdb.Close() })
		w := meteredRedis{UniversalClient: rdb, mu: &sync.Mutex{}, calls: map[string]int{"get": 0}}
		wrappers = append(wrappers, w)
		c := newClientOn(t, w)
		clients = append(clients, c)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the application's traffic through the wrappers
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			for _, w := range wrappers {
				w.count("get")
			}
			if i%64 == 0 {
				time.Sleep(time.Microsecond)
			}
		}
	}()
	for range 200 {
		r := redlatch.NewRedlock("wrapped", clients)
		require.NotNil(t, r)
	}
	close(stop)
	wg.Wait()
	// Distinct wrappers, so NewRedlock accepted them; two Clients made from
	// one wrapper value are still refused.
	_, err := redlatch.NewRedlock("wrapped", clients).TryLock(ctxT(t, 100*time.Millisecond))
	require.NotErrorIs(t, err, redlatch.ErrInvalidArgument)
	a, b := redlatch.New(wrappers[0]), redlatch.New(wrappers[0])
	t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
	_, err = redlatch.NewRedlock("wrapped", []*redlatch.Client{a, b, clients[2]}).TryLock(ctxT(t, time.Second))
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
}

// TestRedlockClosedWithAttemptInFlight: a Redlock's Lock whose round took
// the lock on a quorum of masters (here its only one) while their Client
// was closed, the reply on its way: as any wait in progress at Close
// (TestCloseWithAttemptInFlight), it returns ErrClosed and gives back what
// it took. It returned nil with Lost already closed, the lock left held in
// Redis for its whole lease, renewed by no one.
func TestRedlockClosedWithAttemptInFlight(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, be redistest.Backend) {
		for _, block := range []bool{true, false} {
			t.Run(fmt.Sprint("block=", block), func(t *testing.T) {
				ctx := ctxT(t, 20*time.Second)
				name := redistest.UniqueName(t)
				rdb := be.Client(t)
				hook := &gateScriptHook{match: scriptWith(lockKey(name)), after: true,
					entered: make(chan struct{}), proceed: make(chan struct{})}
				hook.armed.Store(true)
				rdb.AddHook(hook)
				c := newClientOn(t, rdb)
				r := redlatch.NewRedlock(name, []*redlatch.Client{c})
				got := make(chan error, 1)
				go func() {
					if block {
						got <- r.Lock(ctx)
						return
					}
					ok, err := r.TryLock(ctx)
					if err == nil && !ok {
						err = errors.New("not obtained")
					}
					got <- err
				}()
				select {
				case <-hook.entered: // the round took the lock; its reply is held
				case <-time.After(5 * time.Second):
					t.Fatal("no attempt")
				}
				closed := make(chan error, 1)
				go func() { closed <- c.Close() }()
				time.Sleep(100 * time.Millisecond)
				close(hook.proceed)
				require.NoError(t, <-closed)
				require.ErrorIs(t, <-got, redlatch.ErrClosed, "a Redlock wait in progress at Close succeeded after Close")
				require.Eventually(t, func() bool { return be.Client(t).Exists(ctx, lockKey(name)).Val() == 0 },
					2*time.Second, 20*time.Millisecond, "the closed Client's Redlock hold shuts others out")
			})
		}
	})
}

// TestRedlockValidityDriftOfLongerLeases: two of three masters' Clients
// renew on a 30s watchdog timeout, the third on 900ms. The quorum's hold
// lasts the 30s leases, and its validity must allow for the clock drift of
// those leases (30s·1% + 2ms = 302ms): Validity subtracted the drift of the
// shortest lease (11ms) from the 30s deadlines, and reported about 290ms
// during which the masters' clocks may already have expired the lock.
func TestRedlockValidityDriftOfLongerLeases(t *testing.T) {
	servers := redlockServers(t, 3)
	ctx := ctxT(t, 20*time.Second)
	long := 30 * time.Second
	clients := append(redlockClients(t, servers[:2], redlatch.WithWatchdogTimeout(long)),
		redlockClients(t, servers[2:], redlatch.WithWatchdogTimeout(900*time.Millisecond))...)
	r := redlatch.NewRedlock(redistest.UniqueName(t), clients)
	require.NoError(t, r.Lock(ctx))
	v := r.Validity()
	t.Logf("Validity: %v", v)
	require.LessOrEqual(t, v, long-(long/100+2*time.Millisecond), "Validity over the 30s leases less their drift")
	require.Greater(t, v, long/2)
	require.NoError(t, r.Unlock(ctx))
}

// TestZeroRedlockInvalid: a Redlock not made by NewRedlock (its zero value)
// has no masters. Like a zero Mutex, whose methods return an error wrapping
// ErrInvalidArgument, its methods must report bad input at once: Lock must
// not block until ctx ends (for ever with context.Background()), TryLock
// must not report the lock busy, and Do must not hang.
func TestZeroRedlockInvalid(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r := &redlatch.Redlock{}
	start := time.Now()
	require.ErrorIs(t, r.Lock(ctx), redlatch.ErrInvalidArgument)
	ok, err := r.TryLock(ctx)
	require.False(t, ok)
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
	require.ErrorIs(t, r.Unlock(ctx), redlatch.ErrInvalidArgument)
	require.ErrorIs(t, redlatch.Do(ctx, r, func(context.Context) error { return nil }), redlatch.ErrInvalidArgument)
	require.Less(t, time.Since(start), time.Second, "a zero Redlock's calls waited for ctx")
	// A zero Mutex, for comparison, reports bad input.
	require.ErrorIs(t, (&redlatch.Mutex{}).Lock(ctx), redlatch.ErrInvalidArgument)
}

// TestRedlockFailedRoundNotHeldUpBySlotMigration: a Redlock whose masters
// are a Redis Cluster and two single servers. Another owner holds the lock
// on the cluster and on one server, so every round fails. The lock's slot
// migrates on the cluster (its hash and fence key moved): the round's
// attempt there runs (after ASK) and is refused for the holder, but every
// release script there, the round's undo included, is refused with
// TRYAGAIN until the slot moves (it names the wake-up channel, never a
// key). That master granted nothing, so nothing waits for its undo: a
// TryLock returns after its round, and a Lock by its ctx, not an attempt
// timeout (1s here) later. (Found by a reviewer.)
func TestRedlockFailedRoundNotHeldUpBySlotMigration(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 30*time.Second)
	servers := redlockServers(t, 2)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))

	other := newClientOn(t, cl.Client(t))
	require.NoError(t, other.Mutex(name, redlatch.WithLease(20*time.Second)).Lock(ctx))
	require.NoError(t, newClientOn(t, servers[0].Client(t)).Mutex(name, redlatch.WithLease(20*time.Second)).Lock(ctx))

	clients := append([]*redlatch.Client{newClientOn(t, cl.Client(t))}, redlockClients(t, servers)...)
	r := redlatch.NewRedlock(name, clients) // the default lease: an attempt timeout of 1s
	ok, err := r.TryLock(ctx)               // the cluster client's slot map loaded
	require.NoError(t, err)
	require.False(t, ok)

	cl.StartMigration(t, 2, lockKey(name), "{"+name+"}:fence")

	start := time.Now()
	ok, err = r.TryLock(ctx)
	took := time.Since(start)
	require.NoError(t, err)
	require.False(t, ok, "another owner holds 2 of the 3 masters")
	require.Less(t, took, 500*time.Millisecond, "TryLock waited for its undo on the migrating master, which granted nothing")

	lctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start = time.Now()
	err = r.Lock(lctx)
	took = time.Since(start)
	requireWaitErr(t, err, lctx)
	require.Less(t, took, 600*time.Millisecond, "Lock outlasted its ctx (300ms)")
}
