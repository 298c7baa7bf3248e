package redlatch_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// replyDelayHook, once armed, delays the reply of the i-th call matching
// match (from 0) by delays[i], after the call ran on the server.
type replyDelayHook struct {
	passHook
	match  func(redis.Cmder) bool
	delays []time.Duration
	armed  atomic.Bool
	n      atomic.Int32
}

func (h *replyDelayHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.armed.Load() || !h.match(cmd) {
			return next(ctx, cmd)
		}
		i := int(h.n.Add(1)) - 1
		err := next(ctx, cmd)
		if i < len(h.delays) {
			time.Sleep(h.delays[i])
		}
		return err
	}
}

// TestConcurrentReentrantUnlocksNotLost: two goroutines sharing a
// ReentrantMutex handle held twice unlock it concurrently. The first
// release's reply comes back while the second (final) release is in
// flight: the watchdog must not renew the hold again and report it lost
// when the second release has deleted it, nor must the final Unlock return
// ErrNotHeld.
func TestConcurrentReentrantUnlocksNotLost(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		hook := &replyDelayHook{
			match:  scriptWith("{" + name + "}:wake"), // the release script only
			delays: []time.Duration{150 * time.Millisecond, 700 * time.Millisecond},
		}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(300*time.Millisecond))
		m := c.ReentrantMutex(name)
		// Warm up the script caches, so that each release is one call.
		require.NoError(t, m.Lock(ctx))
		require.NoError(t, m.Unlock(ctx))
		require.NoError(t, m.Lock(ctx))
		require.NoError(t, m.Lock(ctx))
		lost := m.Lost()
		hook.armed.Store(true)

		first := make(chan error, 1)
		go func() { first <- m.Unlock(ctx) }()
		time.Sleep(50 * time.Millisecond) // the first release ran; its reply is delayed
		second := make(chan error, 1)
		go func() { second <- m.Unlock(ctx) }()
		requireNoErrWithin(t, first, 2*time.Second, "first Unlock")
		requireOpen(t, lost, "hold lost by a concurrent Unlock")
		requireNoErrWithin(t, second, 2*time.Second, "second Unlock")
		requireOpen(t, lost, "hold reported lost though both Unlocks released it")
		locked, err := m.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
	})
}

// TestLostDuringPartialUnlockWhileServerStopped: a reentrant lock
// (ReentrantMutex, FairMutex, RWMutex's writer) held twice whose partial
// Unlock cannot reach Redis (SIGSTOP) still holds the lock once, and its
// Lost must close at the local lease deadline, as for a hold with no Unlock
// in flight — not only when that Unlock gives up (after its ctx or the
// client's read timeout, here 2s), long after another owner could have
// taken the lock.
func TestLostDuringPartialUnlockWhileServerStopped(t *testing.T) {
	for _, kind := range []string{"ReentrantMutex", "FairMutex", "RWMutex"} {
		t.Run(kind, func(t *testing.T) {
			srv := redistest.NewServer(t)
			ctx := ctxT(t, 20*time.Second)
			timeout := 600 * time.Millisecond
			c := newClientOn(t, srv.Client(t), redlatch.WithWatchdogTimeout(timeout))
			var m redlatch.Locker
			switch kind {
			case "ReentrantMutex":
				m = c.ReentrantMutex("partial")
			case "FairMutex":
				m = c.FairMutex("partial")
			default:
				m = c.RWMutex("partial")
			}
			require.NoError(t, m.Lock(ctx))
			require.NoError(t, m.Lock(ctx))
			lost := m.Lost()
			srv.Stop(t)
			t.Cleanup(func() { srv.Cont(t) })
			stopped := time.Now()
			unlocked := make(chan error, 1)
			go func() { unlocked <- m.Unlock(ctx) }() // partial: one hold remains
			requireClosedWithin(t, lost, timeout+300*time.Millisecond, "Lost while a partial Unlock waits for a frozen Redis")
			require.Less(t, time.Since(stopped), timeout+300*time.Millisecond)
			select {
			case <-unlocked:
				t.Fatal("the Unlock returned before Lost closed: the test proves nothing")
			default:
			}
			srv.Cont(t)
			require.Error(t, <-unlocked)
		})
	}
}

// renewalOf matches the watchdog's renewal of key alone, of the given kind
// (see lua/renew.lua), or of any kind when kind is "".
func renewalOf(key, kind string) func(redis.Cmder) bool {
	return func(cmd redis.Cmder) bool {
		if cmd.Name() != "evalsha" && cmd.Name() != "eval" {
			return false
		}
		args := cmd.Args()
		return len(args) >= 6 && fmt.Sprint(args[2]) == "1" && fmt.Sprint(args[3]) == key && (kind == "" || fmt.Sprint(args[4]) == kind)
	}
}

// TestRWLockCtxNotHeldByRenewal: a blocked RWMutex.Lock whose ctx ends
// while it sleeps in the writers' queue returns at once, not when a
// renewal of its queue place in flight (slow, or stuck on a frozen Redis
// until the renewal's own timeout, a renewal period: 10s by default)
// comes back. FairMutex's waiters already leave without waiting for it.
// Found by a reviewer.
func TestRWLockCtxNotHeldByRenewal(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		holder := newClient(t, b).RWMutex(name)
		require.NoError(t, holder.Lock(ctx))

		rdb := b.Client(t)
		hook := &replyDelayHook{match: renewalOf("{"+name+"}:rw", "f"), delays: []time.Duration{3 * time.Second}}
		hook.armed.Store(true)
		rdb.AddHook(hook)
		timeout := 1500 * time.Millisecond // renewals every 500ms
		c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(timeout))
		w := c.RWMutex(name)
		lctx, cancel := context.WithTimeout(ctx, 900*time.Millisecond)
		defer cancel()
		err := w.Lock(lctx) // queues, sleeps; its place's renewal at ~500ms takes 3s
		ended := time.Now()
		requireWaitErr(t, err, lctx)
		require.Positive(t, hook.n.Load(), "the place's renewal was not in flight")
		d, _ := lctx.Deadline()
		require.Less(t, ended.Sub(d), 500*time.Millisecond, "Lock returned long after its ctx ended")
		require.NoError(t, holder.Unlock(ctx))
	})
}
