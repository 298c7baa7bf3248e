package redlatch_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// scriptCounter is a go-redis hook counting the script calls (EVAL or
// EVALSHA) a client sends; with match set, only those whose arguments it
// accepts.
type scriptCounter struct {
	n     atomic.Int64
	match func(args []any) bool
}

func (h *scriptCounter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *scriptCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if (cmd.Name() == "evalsha" || cmd.Name() == "eval") && (h.match == nil || h.match(cmd.Args())) {
			h.n.Add(1)
		}
		return next(ctx, cmd)
	}
}
func (h *scriptCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestLocalTransfer: when the last Unlock of a Mutex finds waiters of the
// same Client, it hands the lock to the oldest of them inside its script,
// with a new, higher fencing token; the waiter holds it without a round
// trip of its own. Each handoff costs one script call: the Unlock.
func TestLocalTransfer(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		scripts := &scriptCounter{}
		rdb.AddHook(scripts)
		c := redlatch.New(rdb)
		t.Cleanup(func() { _ = c.Close() })

		holder := c.Mutex(name)
		require.NoError(t, holder.Lock(ctx)) // loads the scripts (EVALSHA, then EVAL)
		require.NoError(t, holder.Unlock(ctx))
		require.NoError(t, holder.Lock(ctx))
		const waiters = 3
		ms := make([]*redlatch.Mutex, waiters)
		got := make(chan int, waiters)
		for i := range ms {
			ms[i] = c.Mutex(name)
			go func() {
				if ms[i].Lock(ctx) == nil {
					got <- i
				}
			}()
			time.Sleep(150 * time.Millisecond) // queued in order
		}
		last := holder.Token()
		prev := holder
		for i := range ms {
			scripts.n.Store(0)
			require.NoError(t, prev.Unlock(ctx))
			select {
			case j := <-got:
				require.Equal(t, i, j, "local waiters take the lock in arrival order")
			case <-time.After(5 * time.Second):
				t.Fatal("a local waiter was not handed the lock")
			}
			require.Greater(t, ms[i].Token(), last, "a transfer issues a higher token")
			last = ms[i].Token()
			require.EqualValues(t, 1, scripts.n.Load(), "handoff %d: the Unlock only", i)
			prev = ms[i]
		}
		require.NoError(t, prev.Unlock(ctx))
		locked, err := holder.IsLocked(ctx)
		require.NoError(t, err)
		require.False(t, locked)
	})
}

// TestLocalTransferToCancelledWaiter: a waiter whose wait ends just as an
// Unlock hands it the lock gives the lock back, so it is free (or taken by
// the next waiter), never held by no one for a lease.
func TestLocalTransferToCancelledWaiter(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b)
		for round := 0; round < 20; round++ {
			holder := c.Mutex(name)
			require.NoError(t, holder.Lock(ctx))
			wctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { done <- c.Mutex(name).Lock(wctx) }()
			time.Sleep(50 * time.Millisecond)
			go cancel() // races the Unlock's transfer
			require.NoError(t, holder.Unlock(ctx))
			if err := <-done; err == nil {
				continue // it got the lock first; the handle is dropped (lease expires): use a new name
			}
			require.Eventually(t, func() bool {
				locked, err := holder.IsLocked(ctx)
				return err == nil && !locked
			}, 3*time.Second, 10*time.Millisecond, "round %d: a transfer to a cancelled waiter left the lock held", round)
		}
	})
}
