package redlatch_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestReentryNotQueuedBehindLocalWaiters: an owner that holds a lock and
// calls Lock again while another handle of the same Client waits for that
// lock re-enters at once (ReentrantMutex, RWMutex's writer), and an RWMutex
// reader asking for the write lock gets ErrUpgrade at once. Queueing them
// behind the local waiter would stall them until the next periodic check
// (a third of the watchdog timeout): the waiter waits for them.
func TestReentryNotQueuedBehindLocalWaiters(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c := newClient(t, b) // watchdog timeout 30s: a stall would be 10s
		// waitBehind starts a Lock of other that waits, and returns its end.
		waitBehind := func(lock func(context.Context) error) func() {
			wctx, cancel := context.WithCancel(ctx)
			done := make(chan struct{})
			go func() { defer close(done); _ = lock(wctx) }()
			time.Sleep(300 * time.Millisecond) // queued, subscribed
			return func() { cancel(); <-done }
		}
		within := func(what string, f func() error, want error) {
			t.Helper()
			start := time.Now()
			err := f()
			if want == nil {
				require.NoError(t, err, what)
			} else {
				require.True(t, errors.Is(err, want), "%s: %v", what, err)
			}
			require.Less(t, time.Since(start), 2*time.Second, what)
		}

		name := redistest.UniqueName(t)
		rm := c.ReentrantMutex(name)
		require.NoError(t, rm.Lock(ctx))
		stop := waitBehind(c.ReentrantMutex(name).Lock)
		within("ReentrantMutex re-entry", func() error { return rm.Lock(ctx) }, nil)
		stop()
		require.NoError(t, rm.Unlock(ctx))
		require.NoError(t, rm.Unlock(ctx))

		shared := c.ReentrantMutex(name+"-owner", redlatch.WithOwner("one-owner"))
		require.NoError(t, shared.Lock(ctx))
		stop = waitBehind(c.ReentrantMutex(name + "-owner").Lock)
		within("re-entry through another handle of the owner", func() error {
			return c.ReentrantMutex(name+"-owner", redlatch.WithOwner("one-owner")).Lock(ctx)
		}, nil)
		stop()
		require.NoError(t, shared.Unlock(ctx))
		require.NoError(t, shared.Unlock(ctx))

		rw := c.RWMutex(name + "-rw")
		require.NoError(t, rw.RLock(ctx))
		stop = waitBehind(c.RWMutex(name + "-rw").Lock)
		within("upgrade", func() error { return rw.Lock(ctx) }, redlatch.ErrUpgrade)
		stop()
		require.NoError(t, rw.RUnlock(ctx))

		require.NoError(t, rw.Lock(ctx))
		stop = waitBehind(c.RWMutex(name + "-rw").Lock)
		within("RWMutex write re-entry", func() error { return rw.Lock(ctx) }, nil)
		stop()
		require.NoError(t, rw.Unlock(ctx))
		require.NoError(t, rw.Unlock(ctx))
	})
}
