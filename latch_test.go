package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// latchKey is the documented count key of a latch.
func latchKey(name string) string { return "{" + name + "}:latch" }

func requireCount(t *testing.T, ctx context.Context, l *redlatch.CountDownLatch, want int64) {
	t.Helper()
	n, err := l.Count(ctx)
	require.NoError(t, err)
	require.Equal(t, want, n)
}

// TestLatchWaiters: 4 waiters over 2 Clients wake within 500ms of the count
// reaching zero; a second TrySetCount fails while counting; no key is left.
func TestLatchWaiters(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		clients := []*redlatch.Client{newClient(t, b), newClient(t, b)}
		l := clients[0].CountDownLatch(name)
		requireCount(t, ctx, l, 0)
		ok, err := l.TrySetCount(ctx, 3)
		require.NoError(t, err)
		require.True(t, ok)
		ok, err = clients[1].CountDownLatch(name).TrySetCount(ctx, 5)
		require.NoError(t, err)
		require.False(t, ok, "a second count while counting")
		requireCount(t, ctx, l, 3)

		const waiters = 4
		woke := make(chan time.Time, waiters)
		for i := 0; i < waiters; i++ {
			go func(c *redlatch.Client) {
				if err := c.CountDownLatch(name).Wait(ctx); err != nil {
					t.Error(err)
				}
				woke <- time.Now()
			}(clients[i%2])
		}
		time.Sleep(200 * time.Millisecond)
		require.NoError(t, l.CountDown(ctx))
		require.NoError(t, clients[1].CountDownLatch(name).CountDown(ctx))
		requireCount(t, ctx, l, 1)
		select {
		case <-woke:
			t.Fatal("a waiter returned before the count reached zero")
		case <-time.After(100 * time.Millisecond):
		}
		zero := time.Now()
		require.NoError(t, l.CountDown(ctx))
		for i := 0; i < waiters; i++ {
			select {
			case at := <-woke:
				require.Less(t, at.Sub(zero), 500*time.Millisecond)
			case <-time.After(5 * time.Second):
				t.Fatal("a waiter was not woken")
			}
		}
		requireCount(t, ctx, l, 0)
		requireNoKey(t, ctx, b, latchKey(name))

		// Finished: counting down does nothing, Wait returns at once, and a
		// new count can start.
		require.NoError(t, l.CountDown(ctx))
		requireCount(t, ctx, l, 0)
		require.NoError(t, l.Wait(ctx))
		ok, err = l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, l.CountDown(ctx))
		requireNoKey(t, ctx, b, latchKey(name))
	})
}

// TestLatchErrors: bad input, a failed wait, a closed Client.
func TestLatchErrors(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		c := newClient(t, b)
		name := redistest.UniqueName(t)

		bad := c.CountDownLatch("")
		_, err := bad.TrySetCount(ctx, 1)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
		require.ErrorIs(t, bad.CountDown(ctx), redlatch.ErrInvalidArgument)
		require.ErrorIs(t, bad.Wait(ctx), redlatch.ErrInvalidArgument)
		_, err = bad.Count(ctx)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
		_, err = bad.Delete(ctx)
		require.ErrorIs(t, err, redlatch.ErrInvalidArgument)

		l := c.CountDownLatch(name)
		for _, n := range []int64{0, -3} {
			_, err := l.TrySetCount(ctx, n)
			require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
		}
		requireNoKey(t, ctx, b, latchKey(name))

		ok, err := l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok)
		wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		requireWaitErr(t, l.Wait(wctx), wctx)

		// Another type under the key.
		require.NoError(t, b.Client(t).Set(ctx, latchKey(name), "x", time.Minute).Err())
		_, err = l.Count(ctx)
		require.ErrorIs(t, err, redlatch.ErrWrongType)
		require.NoError(t, b.Client(t).Del(ctx, latchKey(name)).Err())

		closed := newClient(t, b)
		cl := closed.CountDownLatch(name)
		require.NoError(t, closed.Close())
		require.ErrorIs(t, cl.Wait(ctx), redlatch.ErrClosed)
		require.ErrorIs(t, cl.CountDown(ctx), redlatch.ErrClosed)
		_, err = cl.Delete(ctx)
		require.ErrorIs(t, err, redlatch.ErrClosed)
	})
}

// TestLatchDelete: Delete opens a running latch at once: waiters of two
// Clients return nil (woken, long before their watchdog period), the count
// is gone, the latch can be set again, and a Delete resent after a lost
// reply leaves a count set meanwhile alone.
func TestLatchDelete(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		clients := []*redlatch.Client{newClient(t, b), newClient(t, b)} // re-checks every 10s
		l := clients[0].CountDownLatch(name)
		deleted, err := l.Delete(ctx)
		require.NoError(t, err)
		require.False(t, deleted, "nothing was running")
		ok, err := l.TrySetCount(ctx, 3)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, l.CountDown(ctx)) // the recent request ids' key exists too

		woke := make(chan error, 2)
		for _, c := range clients {
			go func(c *redlatch.Client) { woke <- c.CountDownLatch(name).Wait(ctx) }(c)
		}
		time.Sleep(200 * time.Millisecond) // both subscribed
		deleted, err = clients[1].CountDownLatch(name).Delete(ctx)
		require.NoError(t, err)
		require.True(t, deleted)
		for range clients {
			requireNoErrWithin(t, woke, time.Second, "a waiter of the deleted latch did not return")
		}
		requireCount(t, ctx, l, 0)
		requireNoKey(t, ctx, b, latchKey(name))
		ttl, err := b.Client(t).PTTL(ctx, latchKey(name)+":done").Result()
		require.NoError(t, err) // the Delete's request id, for its retries
		require.True(t, ttl > 0 && ttl <= time.Minute, "request ids kept %v", ttl)
		ok, err = l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok, "set again after Delete")
		require.NoError(t, l.CountDown(ctx))

		// A Delete resent after its reply was lost, once another process
		// has set a new count, leaves that count alone.
		lc, hook := lossyClient(t, b, scriptWith(latchKey(name)), true)
		ok, err = l.TrySetCount(ctx, 2)
		require.NoError(t, err)
		require.True(t, ok)
		hook.between = func() {
			ok, err := l.TrySetCount(ctx, 4)
			require.NoError(t, err)
			require.True(t, ok)
		}
		hook.armed.Store(true)
		deleted, err = lc.CountDownLatch(name).Delete(ctx)
		require.NoError(t, err)
		require.True(t, deleted, "the resend reports what the first run did")
		requireCount(t, ctx, l, 4)
	})
}

// TestLatchLostWakeup: a latch opened without a wake-up (its key deleted)
// releases its waiter within a watchdog period.
func TestLatchLostWakeup(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		const timeout = 300 * time.Millisecond // period: 100ms
		l := newClient(t, b, redlatch.WithWatchdogTimeout(timeout)).CountDownLatch(name)
		ok, err := l.TrySetCount(ctx, 2)
		require.NoError(t, err)
		require.True(t, ok)
		done := make(chan time.Time, 1)
		go func() {
			if err := l.Wait(ctx); err != nil {
				t.Error(err)
			}
			done <- time.Now()
		}()
		time.Sleep(200 * time.Millisecond)
		opened := time.Now()
		require.NoError(t, b.Client(t).Del(ctx, latchKey(name)).Err())
		select {
		case at := <-done:
			// At most one watchdog period (100ms) with a lost wake-up (a
			// DEL publishes none), plus slack for a loaded CI machine.
			require.Less(t, at.Sub(opened), time.Second)
		case <-time.After(10 * time.Second):
			t.Fatal("the waiter did not notice the open latch")
		}
	})
}

func ExampleCountDownLatch() {
	rdb, done := exampleRedis()
	defer done()
	ctx := context.Background()
	client := redlatch.New(rdb)
	defer client.Close()

	latch := client.CountDownLatch("warm-up")
	ok, _ := latch.TrySetCount(ctx, 2)
	fmt.Println("set:", ok)

	waited := make(chan error)
	go func() { waited <- client.CountDownLatch("warm-up").Wait(ctx) }()

	_ = latch.CountDown(ctx)
	n, _ := latch.Count(ctx)
	fmt.Println("count:", n)
	_ = latch.CountDown(ctx)
	fmt.Println("waiter:", <-waited)
	// Output:
	// set: true
	// count: 1
	// waiter: <nil>
}

// TestLatchCountDownRetried: a TrySetCount or CountDown whose reply was
// lost and that the client retried takes effect once and reports it; the final one opens the latch and leaves
// no key behind.
func TestLatchCountDownRetried(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c, hook := lossyClient(t, b, scriptWith("{"+name+"}:latch"), true)
		l := c.CountDownLatch(name)
		hook.armed.Store(true) // the set runs twice on the server
		ok, err := l.TrySetCount(ctx, 3)
		require.NoError(t, err)
		require.True(t, ok, "a retried TrySetCount reported another count")
		for want := int64(2); want >= 0; want-- {
			hook.armed.Store(true) // the script runs twice on the server
			require.NoError(t, l.CountDown(ctx))
			n, err := l.Count(ctx)
			require.NoError(t, err)
			require.Equal(t, want, n, "a retried CountDown counted twice")
		}
		require.NoError(t, l.Wait(ctx))
		rdb := b.Client(t)
		require.Zero(t, rdb.Exists(ctx, "{"+name+"}:latch").Val(), "the count outlived its end")
		ttl := rdb.PTTL(ctx, "{"+name+"}:latch:done").Val()
		require.True(t, ttl > 0 && ttl <= time.Minute, "the request ids live %v", ttl)
	})
}

// TestLatchResendAcrossRounds: a call whose reply was lost and that go-redis
// resends after its latch opened and was set again acts once, at its first
// run. The final CountDown of one round, resent, does not count the next
// round down; a TrySetCount resent after its count finished does not set
// the latch again; a CountDown or Delete that found the latch open does
// nothing to a count set before its resend.
func TestLatchResendAcrossRounds(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c, hook := lossyClient(t, b, scriptWith("{"+name+"}:latch"), true)
		l, other := c.CountDownLatch(name), newClient(t, b).CountDownLatch(name)
		// Load every script: a NOSCRIPT reply would disarm the hook.
		require.NoError(t, l.CountDown(ctx))
		_, err := l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		_, err = l.Delete(ctx)
		require.NoError(t, err)
		requireCount := func(want int64, msg string) {
			t.Helper()
			n, err := l.Count(ctx)
			require.NoError(t, err)
			require.Equal(t, want, n, msg)
		}
		nextRound := func() { // between the first run and the resend
			ok, err := other.TrySetCount(ctx, 2)
			require.NoError(t, err)
			require.True(t, ok)
		}

		ok, err := other.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok)
		hook.between = func() { // the final CountDown ran; its reply is lost
			require.NoError(t, other.Wait(ctx))
			nextRound()
		}
		hook.armed.Store(true)
		require.NoError(t, l.CountDown(ctx))
		requireCount(2, "the resent CountDown counted the next round down")

		hook.between = func() { // the count was set; the reply is lost
			require.NoError(t, other.CountDown(ctx))
			require.NoError(t, other.CountDown(ctx))
			require.NoError(t, other.CountDown(ctx))
		}
		_, err = l.Delete(ctx)
		require.NoError(t, err)
		hook.armed.Store(true)
		ok, err = l.TrySetCount(ctx, 3)
		require.NoError(t, err)
		require.True(t, ok, "a resent TrySetCount reported another count")
		requireCount(0, "the resent TrySetCount set the finished latch again")

		hook.between = nextRound // a CountDown of the open latch; its reply is lost
		hook.armed.Store(true)
		require.NoError(t, l.CountDown(ctx))
		requireCount(2, "a CountDown of the open latch, resent, counted the next round down")

		_, err = l.Delete(ctx)
		require.NoError(t, err)
		hook.between = nextRound // a Delete of the open latch; its reply is lost
		hook.armed.Store(true)
		deleted, err := l.Delete(ctx)
		require.NoError(t, err)
		require.False(t, deleted, "a Delete that found no count reported one")
		requireCount(2, "a Delete of the open latch, resent, deleted the next round")
	})
}

// TestLatchForeignKey: a count key holding data redlatch did not write (a
// string that is not a count, or another type) gives ErrWrongType from every
// method, as errors.go documents, and is left alone: TrySetCount does not
// report a running count, and Delete does not delete the foreign data.
func TestLatchForeignKey(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 5*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		l := newClient(t, b).CountDownLatch(name)
		for _, put := range []struct {
			kind string
			set  func() error
		}{
			{"string", func() error { return rdb.Set(ctx, latchKey(name), "foreign", 0).Err() }},
			{"hash", func() error { return rdb.HSet(ctx, latchKey(name), "f", "v").Err() }},
		} {
			require.NoError(t, put.set())
			_, err := l.Count(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, put.kind)
			ok, err := l.TrySetCount(ctx, 2)
			require.ErrorIs(t, err, redlatch.ErrWrongType, "TrySetCount on a foreign %s (ok=%v)", put.kind, ok)
			require.ErrorIs(t, l.CountDown(ctx), redlatch.ErrWrongType, "CountDown on a foreign %s", put.kind)
			deleted, err := l.Delete(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, "Delete on a foreign %s (deleted=%v)", put.kind, deleted)
			require.EqualValues(t, 1, rdb.Exists(ctx, latchKey(name)).Val(), "the foreign %s was deleted", put.kind)
			require.NoError(t, rdb.Del(ctx, latchKey(name)).Err())
		}
	})
}

// TestReadsOnMaster: on a Redis client that routes read-only commands to
// a replica (a ClusterClient with ReadOnly: the go-redis setup of a master
// with replicas, and what NewFailoverClusterClient with ReplicaOnly builds),
// the methods that read state read it on the master, which the scripts
// write. Read from a lagging replica:
//   - a latch's count just set reads 0 (a Wait returns before anyone
//     counted down), and a waiter woken by the final CountDown reads the
//     old count and sleeps on (here, while the replica lags, for good);
//   - a lock just taken reads free, with no lease, and held 0 times.
//
// (The latch's part found by a reviewer.)
func TestReadsOnMaster(t *testing.T) {
	master, replica, link := replicaPair(t)
	ctx := ctxT(t, 10*time.Second)
	name := redistest.UniqueName(t)
	rdb := redis.NewClusterClient(&redis.ClusterOptions{
		ReadOnly: true,
		ClusterSlots: func(context.Context) ([]redis.ClusterSlot, error) {
			return []redis.ClusterSlot{{Start: 0, End: 16383, Nodes: []redis.ClusterNode{
				{Addr: master.Addr}, {Addr: replica.Addr}}}}, nil
		},
	})
	t.Cleanup(func() { _ = rdb.Close() })
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(3*time.Second)) // re-checks every 1s
	t.Cleanup(func() { _ = c.Close() })

	l := c.CountDownLatch(name)
	ok, err := l.TrySetCount(ctx, 1)
	require.NoError(t, err)
	require.True(t, ok)
	waitInSync(t, master, replica) // the count is on the replica too
	link.Partition()               // from now on the replica lags

	// A count set now is not on the replica.
	fresh := c.CountDownLatch(name + "-fresh")
	ok, err = fresh.TrySetCount(ctx, 2)
	require.NoError(t, err)
	require.True(t, ok)
	requireCount(t, ctx, fresh, 2)
	wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	requireWaitErr(t, fresh.Wait(wctx), wctx)

	// The final CountDown's wake-up lets the waiter through.
	woke := make(chan error, 1)
	go func() { woke <- l.Wait(ctx) }()
	time.Sleep(200 * time.Millisecond)
	require.NoError(t, l.CountDown(ctx))
	requireNoErrWithin(t, woke, 2*time.Second, "the waiter slept on after the count reached zero")
	requireCount(t, ctx, l, 0)

	// A lock taken now is not on the replica.
	for _, m := range []interface {
		Lock(context.Context) error
		Unlock(context.Context) error
		IsLocked(context.Context) (bool, error)
		TTL(context.Context) (time.Duration, error)
		HoldCount(context.Context) (int, error)
	}{c.ReentrantMutex(name + "-lock"), c.FairMutex(name + "-fair")} {
		require.NoError(t, m.Lock(ctx))
		locked, err := m.IsLocked(ctx)
		require.NoError(t, err)
		require.True(t, locked, "IsLocked")
		ttl, err := m.TTL(ctx)
		require.NoError(t, err)
		require.Positive(t, ttl, "TTL")
		n, err := m.HoldCount(ctx)
		require.NoError(t, err)
		require.Equal(t, 1, n, "HoldCount")
		require.NoError(t, m.Unlock(ctx))
	}
}

// TestLatchLateTrySetCountCopy: a TrySetCount that found a count running
// reports false. When a copy of that very call reaches Redis late (go-redis
// resent it after a read timeout, and the resend, which found the count
// running, answered first; the first copy was stuck in a slow link), it
// must not set the latch once the count finished: its caller was told
// false, and a count has no expiry, so the stray count would block every
// Wait until someone Deletes it. CountDown and Delete remember the calls
// that found nothing to do for this (latch_countdown.lua); a TrySetCount
// that found a count running was not remembered, and its late copy set the
// count. Found by a reviewer.
func TestLatchLateTrySetCountCopy(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		hook := &copyHook{match: scriptWith(latchKey(name)), pass: true}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb)
		l, other := c.CountDownLatch(name), newClient(t, b).CountDownLatch(name)
		// Load the script: a NOSCRIPT reply would make the copy an EVALSHA
		// that fails.
		_, err := l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		_, err = l.Delete(ctx)
		require.NoError(t, err)

		ok, err := other.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok)
		hook.armed.Store(true)
		ok, err = l.TrySetCount(ctx, 3) // the count runs: false
		require.NoError(t, err)
		require.False(t, ok)
		require.NoError(t, other.CountDown(ctx)) // the count finishes

		late := hook.copy()
		require.NotEmpty(t, late)
		_ = rdb.Do(ctx, late...).Err() // the stuck first copy arrives
		requireCount(t, ctx, l, 0)
		wctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		require.NoError(t, other.Wait(wctx), "Wait blocks on a count nobody set")
	})
}

// TestLatchReplyLost: a CountDown whose reply is lost for good (go-redis
// does not resend: MaxRetries -1, as the README advises "where that
// matters", retries used up, or a ctx that ended with the reply on the way)
// has counted down in Redis, but returned an error. Its caller could do
// nothing safe: the request id is CountDown's own, so calling it again
// counts down twice (the latch opens before the work it waits for is
// done), and not calling it risks a count that never opens (a count has no
// expiry). Like Semaphore.Release, every latch call that changes the count
// now resends such a call itself, with the same request id, which Redis
// applies once. Found by a reviewer.
func TestLatchReplyLost(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		l, hook := lossyLatch(t, ctx, b, name, false)

		hook.armed.Store(true) // runs on the server, the reply is lost
		ok, err := l.TrySetCount(ctx, 3)
		require.NoError(t, err, "a TrySetCount that set the count reported an error")
		require.True(t, ok)
		requireCount(t, ctx, l, 3)

		hook.armed.Store(true)
		require.NoError(t, l.CountDown(ctx), "a CountDown that counted down reported an error: calling it again counts twice")
		requireCount(t, ctx, l, 2)

		hook.armed.Store(true)
		deleted, err := l.Delete(ctx)
		require.NoError(t, err, "a Delete that deleted the count reported an error")
		require.True(t, deleted)
		requireCount(t, ctx, l, 0)
	})
}

// TestLatchCountDownWithEndedCtx: a CountDown (or Delete) given a ctx that
// has ended already is sent with a fresh bounded context, as Semaphore.Release
// and Unlock are: the usual `defer latch.CountDown(ctx)` of a task whose ctx
// was cancelled or timed out must still count down, else the latch, which
// never expires, keeps every Wait blocked for good.
func TestLatchCountDownWithEndedCtx(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		l := newClient(t, b).CountDownLatch(name)
		ok, err := l.TrySetCount(ctx, 2)
		require.NoError(t, err)
		require.True(t, ok)
		waiter := newClient(t, b).CountDownLatch(name)
		waited := make(chan error, 1)
		go func() { waited <- waiter.Wait(ctx) }()

		ended, cancel := context.WithCancel(ctx)
		cancel()
		require.NoError(t, l.CountDown(ended), "a CountDown with an ended ctx was not sent")
		requireCount(t, ctx, l, 1)
		deleted, err := l.Delete(ended)
		require.NoError(t, err, "a Delete with an ended ctx was not sent")
		require.True(t, deleted)
		requireNoErrWithin(t, waited, 2*time.Second, "the waiter was not released")
		requireNoKey(t, ctx, b, latchKey(name))
	})
}

// TestLatchWaitHonoursContextOnDefaultOptions: on a *redis.Client with
// go-redis's default ContextTimeoutEnabled (off), a Wait whose ctx ends
// while Redis does not answer returns by its ctx, as Lock does (see
// TestUnresponsiveRedisOnDefaultOptions): its count reads (a MULTI, not a
// script) went unrouted and returned after the client's ReadTimeout (here
// 5s); so did Count and IsLocked.
func TestLatchWaitHonoursContextOnDefaultOptions(t *testing.T) {
	srv := redistest.NewServer(t)
	c := defaultOptionsClient(t, srv)
	l := c.CountDownLatch(redistest.UniqueName(t))
	ok, err := l.TrySetCount(ctxT(t, 5*time.Second), 1)
	require.NoError(t, err)
	require.True(t, ok)
	m := c.Mutex(redistest.UniqueName(t))

	resume := freeze(t, srv)
	for name, call := range map[string]func(ctx context.Context) error{
		"Wait": func(ctx context.Context) error {
			err := l.Wait(ctx)
			require.ErrorIs(t, err, redlatch.ErrNotObtained)
			require.ErrorIs(t, err, context.DeadlineExceeded) // as documented
			return err
		},
		"Count":    func(ctx context.Context) error { _, err := l.Count(ctx); return err },
		"IsLocked": func(ctx context.Context) error { _, err := m.IsLocked(ctx); return err },
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		start := time.Now()
		err := call(ctx)
		took := time.Since(start)
		cancel()
		require.Error(t, err, name) // a read's: the i/o timeout of its ctx's deadline
		require.Less(t, took, 300*time.Millisecond+700*time.Millisecond, "%s outlasted its ctx", name)
	}
	resume()
	// The reads still work, and see the count.
	requireCount(t, ctxT(t, 5*time.Second), l, 1)
}

// cancelAtInfo passes every command on, and once armed cancels its ctx
// (the caller's) at the first INFO: the caller's ctx ends while the
// Client checks the masters' versions.
type cancelAtInfo struct {
	passHook
	mu     *sync.Mutex
	cancel *context.CancelFunc
}

func (h cancelAtInfo) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "info" {
			h.mu.Lock()
			if c := *h.cancel; c != nil {
				c()
				*h.cancel = nil
			}
			h.mu.Unlock()
		}
		return next(ctx, cmd)
	}
}

// TestLatchCountDownCtxEndsDuringVersionCheck: a CountDown (or Delete)
// whose ctx ends on the way, before its script is sent, is still sent, as
// the godoc promises ("it is sent even when ctx has ended already"): on a
// cluster the first call of a Client checks the masters' versions first
// (publishCommand), and a ctx cancelled during that check made run return
// the ctx's error without sending the script. The deferred CountDown of a
// task cancelled at that moment was lost, and the latch, which never
// expires, kept every Wait blocked.
func TestLatchCountDownCtxEndsDuringVersionCheck(t *testing.T) {
	b := clusterBackend(t)
	ctx := ctxT(t, 10*time.Second)
	for _, kind := range []string{"CountDown", "Delete"} {
		t.Run(kind, func(t *testing.T) {
			name := redistest.UniqueName(t)
			other := newClient(t, b).CountDownLatch(name)
			ok, err := other.TrySetCount(ctx, 1)
			require.NoError(t, err)
			require.True(t, ok)

			var mu sync.Mutex
			var cancel context.CancelFunc
			cctx, c := context.WithCancel(ctx)
			defer c()
			cancel = c
			l := infoHookedClient(t, b, cancelAtInfo{mu: &mu, cancel: &cancel}).CountDownLatch(name)
			if kind == "CountDown" {
				err = l.CountDown(cctx)
			} else {
				_, err = l.Delete(cctx)
			}
			mu.Lock()
			armed := cancel != nil
			mu.Unlock()
			require.False(t, armed, "no version check during the call")
			require.NoError(t, err, "the %s was not sent", kind)
			requireCount(t, ctx, other, 0)
		})
	}
}

// TestLatchForeignIntegerString: a count key holding a string of digits
// that is no count redlatch could have written (out of int64's range, or
// with leading zeros: Redis's DECR refuses both) is foreign data, as
// Count already says (ErrWrongType). The scripts took it for a running
// count: TrySetCount reported a count running, CountDown failed with a
// plain ERR reply, and Delete deleted the other program's data and
// reported a count running.
//
// "0" and negative integers are no count redlatch writes either (a running
// count is positive; the final CountDown deletes the key), yet Count read
// them as an open latch (0: Wait returned at once) while TrySetCount
// reported a count running (false, for good: no round could start),
// Delete reported a running count and deleted the other program's data,
// and CountDown "opened" it. (Found by a reviewer.)
func TestLatchForeignIntegerString(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 5*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		l := newClient(t, b).CountDownLatch(name)
		for _, v := range []string{"99999999999999999999", "007", "0", "-3"} {
			require.NoError(t, rdb.Set(ctx, latchKey(name), v, 0).Err())
			n, err := l.Count(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, "Count of %q (n=%d)", v, n)
			require.ErrorIs(t, l.Wait(ctx), redlatch.ErrWrongType, "Wait on %q", v)
			ok, err := l.TrySetCount(ctx, 2)
			require.ErrorIs(t, err, redlatch.ErrWrongType, "TrySetCount on %q (ok=%v)", v, ok)
			require.ErrorIs(t, l.CountDown(ctx), redlatch.ErrWrongType, "CountDown on %q", v)
			deleted, err := l.Delete(ctx)
			require.ErrorIs(t, err, redlatch.ErrWrongType, "Delete on %q (deleted=%v)", v, deleted)
			require.Equal(t, v, rdb.Get(ctx, latchKey(name)).Val(), "the foreign %q was changed", v)
			require.NoError(t, rdb.Del(ctx, latchKey(name)).Err())
		}
	})
}

// TestLatchLostReplyRetryRefusedBusy: a latch call runs in Redis, its reply
// is lost, and go-redis's resend of it is refused with BUSY (another
// client's script runs past busy-reply-threshold; go-redis does not retry
// BUSY). The call took effect at its first run, yet it returned the BUSY
// reply, which says the command did not run: a caller that calls again
// counts down twice (the latch opens before the work it waits for is
// done), and a TrySetCount that set the count reports that it did not.
// The godoc promises such a call "reports what it did rather than an error
// after which calling again would act twice": a call refused so must be
// sent again (same request id: Redis applies it once) until Redis answers.
// (Found by a reviewer.)
func TestLatchLostReplyRetryRefusedBusy(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	l, hook := lossyLatch(t, ctx, serverBackend(srv), name, true)

	var busy <-chan error
	hook.between = func() { busy = srv.BusyFor(t, 300*time.Millisecond) }

	hook.armed.Store(true) // the set runs; go-redis's resend is refused
	ok, err := l.TrySetCount(ctx, 3)
	require.NoError(t, <-busy)
	require.NoError(t, err, "a TrySetCount that set the count reported an error")
	require.True(t, ok)
	requireCount(t, ctx, l, 3)

	hook.armed.Store(true) // the CountDown runs; go-redis's resend is refused
	err = l.CountDown(ctx)
	require.NoError(t, <-busy)
	require.NoError(t, err, "a CountDown that counted down reported an error: calling it again counts twice")
	requireCount(t, ctx, l, 2)

	hook.armed.Store(true) // the Delete runs; go-redis's resend is refused
	deleted, err := l.Delete(ctx)
	require.NoError(t, <-busy)
	require.NoError(t, err, "a Delete that deleted the count reported an error")
	require.True(t, deleted)
	requireCount(t, ctx, l, 0)
	require.NoError(t, l.Wait(ctx))
}

// lossyLatch returns the latch name on a Client of b whose script calls on
// the latch lossyClient's hook loses the replies of (retry: go-redis sends
// them again), with its scripts loaded: a NOSCRIPT reply would disarm the
// hook.
func lossyLatch(t *testing.T, ctx context.Context, b redistest.Backend, name string, retry bool) (*redlatch.CountDownLatch, *lossyHook) {
	t.Helper()
	c, hook := lossyClient(t, b, scriptWith(latchKey(name)), retry)
	l := c.CountDownLatch(name)
	warmLatch(t, ctx, l)
	return l, hook
}

// warmLatch loads the scripts of l's calls that change the count, and
// leaves l deleted.
func warmLatch(t *testing.T, ctx context.Context, l *redlatch.CountDownLatch) {
	t.Helper()
	require.NoError(t, l.CountDown(ctx))
	_, err := l.TrySetCount(ctx, 1)
	require.NoError(t, err)
	_, err = l.Delete(ctx)
	require.NoError(t, err)
}

// busyReply is a BUSY reply from Redis (the script did not run).
type busyReply string

func (e busyReply) Error() string { return string(e) }
func (busyReply) RedisError()     {}

// refusedThenLostHook makes the next matching script call, once armed, be
// refused with BUSY without reaching Redis, and the call after it run on
// the server with its reply lost (go-redis's retries failed): the outcome
// of that second send is unknown to the client.
type refusedThenLostHook struct {
	passHook
	match func(redis.Cmder) bool
	mu    sync.Mutex
	step  int // 0: disarmed; 1: refuse next; 2: lose next reply
}

func (h *refusedThenLostHook) arm() {
	h.mu.Lock()
	h.step = 1
	h.mu.Unlock()
}

func (h *refusedThenLostHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.match(cmd) {
			return next(ctx, cmd)
		}
		h.mu.Lock()
		step := h.step
		if step > 0 {
			h.step = (step + 1) % 3
		}
		h.mu.Unlock()
		switch step {
		case 1:
			err := busyReply("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.")
			cmd.SetErr(err)
			return err
		case 2:
			if err := next(ctx, cmd); err != nil {
				return err
			}
			cmd.SetErr(io.ErrUnexpectedEOF)
			return io.ErrUnexpectedEOF
		}
		return next(ctx, cmd)
	}
}

// TestLatchRefusedThenLostReplyNotReportedRefused: a latch call is refused
// with BUSY (the script did not run), so it is sent again (a6642ef); that
// resend runs on the server, but its reply is lost. The call returned the
// first BUSY reply, which says that nothing ran, although the resend had
// counted down (or set the count): a caller that calls again on BUSY counts
// down twice, and a TrySetCount called again reports its own count as
// another's. The call must report an unknown outcome (a network error), as
// a call whose resend after a lost reply failed does. (Found by a reviewer
// of a6642ef.)
func TestLatchRefusedThenLostReplyNotReportedRefused(t *testing.T) {
	srv := redistest.NewServer(t)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	rdb := serverBackend(srv).Client(t)
	hook := &refusedThenLostHook{match: scriptWith(latchKey(name))}
	rdb.AddHook(hook)
	c := newClientOn(t, rdb)
	l := c.CountDownLatch(name)
	warmLatch(t, ctx, l)

	refused := func(err error) bool { return err != nil && strings.HasPrefix(err.Error(), "BUSY") }

	hook.arm() // refused, then set with its reply lost
	_, err := l.TrySetCount(ctx, 2)
	requireCount(t, ctx, l, 2)
	require.False(t, refused(err), "a TrySetCount that set the count reported BUSY (did not run): %v", err)

	hook.arm() // refused, then counted down with its reply lost
	err = l.CountDown(ctx)
	requireCount(t, ctx, l, 1)
	require.False(t, refused(err), "a CountDown that counted down reported BUSY (did not run): calling again counts twice: %v", err)
}

// TestLatchRunThenRefusedPastTryAgainWaitNotReportedRefused: on a Redis
// Cluster, a latch call runs in Redis, its reply is lost, and go-redis's
// resend is refused because the latch's slot has started migrating (ASK,
// then TRYAGAIN: the wake-up channel, a KEYS entry, never exists where it
// lands). tryAgainHook sends it again for tryAgainWait (5s) and then
// returns the TRYAGAIN reply; the latch took that refusal for Redis's
// answer ("did not run") and returned it, though the call had counted down
// (set the count, deleted it). A caller that calls again on a refusal counts
// down twice, and a TrySetCount called again reports its own count as
// another's. Acquisitions count such a refusal as an unknown outcome
// (outcomeUnknown, TestAcquireRunThenRefusedPastTryAgainWaitIsUndone); the
// latch must not report it as a refusal either (README: "never reports a
// refusal after a send that may have run"). (Found by a reviewer.)
func TestLatchRunThenRefusedPastTryAgainWaitNotReportedRefused(t *testing.T) {
	t.Parallel() // see TestMain
	cl := redistest.NewCluster(t, 3)
	cases := []struct {
		what  string
		setup int64 // the count before the call
		call  func(context.Context, *redlatch.CountDownLatch) error
		want  int64 // the count after its single run
	}{
		{"CountDown", 3, func(ctx context.Context, l *redlatch.CountDownLatch) error { return l.CountDown(ctx) }, 2},
		{"TrySetCount", 0, func(ctx context.Context, l *redlatch.CountDownLatch) error {
			_, err := l.TrySetCount(ctx, 4)
			return err
		}, 4},
		{"Delete", 2, func(ctx context.Context, l *redlatch.CountDownLatch) error {
			_, err := l.Delete(ctx)
			return err
		}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.what, func(t *testing.T) {
			t.Parallel() // each on a slot of its own
			// Its own: a parallel subtest starts once its parent has
			// returned, and once -parallel lets it, maybe long after.
			ctx := ctxT(t, 60*time.Second)
			name := nameOn(t, cl, 1, redistest.UniqueName(t))
			tag := "{" + name + "}"
			cc := cl.Client(t)
			l := newClientOn(t, cc).CountDownLatch(name)
			warmLatch(t, ctx, l) // the slot map is loaded, the scripts too
			if tc.setup > 0 {
				ok, err := l.TrySetCount(ctx, tc.setup)
				require.NoError(t, err)
				require.True(t, ok)
			}
			// Inside tryAgainHook: the call runs, then its slot starts
			// migrating and go-redis's resend is refused from then on.
			cc.AddHook(&lostThenRefused{key: latchKey(name), migrate: func() {
				cl.StartMigration(t, 2, tag+":latch:done")
			}})
			err := tc.call(ctx, l)
			var reply redis.Error
			refused := errors.As(err, &reply)
			cl.MoveSlot(t, redistest.KeySlot(tag), 2)
			requireCount(t, ctx, newClientOn(t, cl.Client(t)).CountDownLatch(name), tc.want)
			require.False(t, refused, "a %s that ran reported a refusal (did not run): calling again acts twice: %v", tc.what, err)
		})
	}
}
