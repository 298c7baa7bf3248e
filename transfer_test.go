package redlatch_test

import (
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// scriptCounter is a go-redis hook counting the script calls (EVAL or
// EVALSHA) a client sends alone (n; with match set, only those whose
// arguments it accepts) and in pipelines (piped), and the other commands
// but the connections' handshakes and SCRIPT LOAD (other).
type scriptCounter struct {
	passHook
	n, piped, other atomic.Int64
	match           func(args []any) bool
}

func (h *scriptCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if n := cmd.Name(); n == "evalsha" || n == "eval" {
			if h.match == nil || h.match(cmd.Args()) {
				h.n.Add(1)
			}
		} else if n != "hello" && n != "client" && n != "script" {
			h.other.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (h *scriptCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if n := cmd.Name(); n == "evalsha" || n == "eval" {
				h.piped.Add(1)
			}
		}
		return next(ctx, cmds)
	}
}

// countingClient returns a Client of b whose script calls are counted, with
// its Redis client and the counter.
func countingClient(t *testing.T, b redistest.Backend) (*redlatch.Client, redis.UniversalClient, *scriptCounter) {
	t.Helper()
	rdb := b.Client(t)
	scripts := &scriptCounter{}
	rdb.AddHook(scripts)
	c := newClientOn(t, rdb)
	return c, rdb, scripts
}

// TestLocalTransfer: when the last Unlock of a Mutex finds waiters of the
// same Client, it hands the lock to the oldest of them inside its script,
// with a new, higher fencing token; the waiter holds it without a round
// trip of its own. Each handoff costs one script call: the Unlock.
func TestLocalTransfer(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c, _, scripts := countingClient(t, b)

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
			waiter := c.Mutex(name)
			go func() { done <- waiter.Lock(wctx) }()
			time.Sleep(50 * time.Millisecond)
			go cancel() // races the Unlock's transfer
			require.NoError(t, holder.Unlock(ctx))
			if err := <-done; err == nil {
				// It took the lock before the cancel: a plain hold, which
				// the watchdog renews until it is released.
				require.NoError(t, waiter.Unlock(ctx))
				continue
			}
			require.Eventually(t, func() bool {
				locked, err := holder.IsLocked(ctx)
				return err == nil && !locked
			}, 3*time.Second, 10*time.Millisecond, "round %d: a transfer to a cancelled waiter left the lock held", round)
		}
	})
}

// publishes sums PUBLISH and SPUBLISH calls over every node's commandstats.
func publishes(t *testing.T, b redistest.Backend) int64 {
	t.Helper()
	return commandCalls(t, b, "publish", "spublish")
}

// TestReleasePublishesOnlyWhenWaited: an Unlock publishes a wake-up only
// when an attempt failed during the hold, or when its own Client has
// waiters; uncontended pairs publish nothing. A waiter of another Client
// still wakes at once, also when the hold it failed on was handed on by a
// local transfer first, though the leases here are a minute long.
func TestReleasePublishesOnlyWhenWaited(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if !b.Real() {
			t.Skip("miniredis has no INFO commandstats")
		}
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		lease := redlatch.WithLease(time.Minute)
		a, other := newClient(t, b), newClient(t, b)

		m := a.Mutex(name, lease)
		before := publishes(t, b)
		for range 20 {
			require.NoError(t, m.Lock(ctx))
			require.NoError(t, m.Unlock(ctx))
		}
		require.Equal(t, before, publishes(t, b), "uncontended pairs published")

		// A waiter of another Client, behind a hold that a waiter of the
		// holder's Client takes over by a local transfer.
		require.NoError(t, m.Lock(ctx))
		local := a.Mutex(name, lease)
		localGot := make(chan error, 1)
		go func() { localGot <- local.Lock(ctx) }()
		remote := other.Mutex(name, lease)
		remoteGot := make(chan error, 1)
		go func() { remoteGot <- remote.Lock(ctx) }()
		admin := b.Client(t)
		require.Eventually(t, func() bool {
			f, err := admin.HExists(ctx, lockKey(name), "w").Result()
			return err == nil && f
		}, 5*time.Second, 5*time.Millisecond, "the remote waiter's failed attempt marks the hold")
		time.Sleep(50 * time.Millisecond) // the local waiter joins too
		require.NoError(t, m.Unlock(ctx))
		select {
		case err := <-localGot:
			require.NoError(t, err)
		case err := <-remoteGot:
			require.NoError(t, err)
			require.NoError(t, remote.Unlock(ctx))
			require.NoError(t, <-localGot)
		case <-time.After(5 * time.Second):
			t.Fatal("no waiter took the lock")
		}
		if local.Token() != 0 {
			start := time.Now()
			require.NoError(t, local.Unlock(ctx))
			requireNoErrWithin(t, remoteGot, 5*time.Second, "the remote waiter was not woken")
			require.Less(t, time.Since(start), 5*time.Second)
			require.NoError(t, remote.Unlock(ctx))
		}
		require.Greater(t, publishes(t, b), before, "a waited-for release published")
	})
}

// TestHandoffFenceWrite: a handoff (a Mutex's local transfer, a FairMutex's
// grant) writes the new token into the fence key before reading the old
// value, in one call, and writes again when the old value asks for it: a
// token at or ahead of the server clock (as a faster clock before a
// failover issued) is passed, and the tombstones of undone acquisitions are
// kept. The new token passes the held one too, when that was issued ahead
// of the clock and the fence key was lost during the hold.
func TestHandoffFenceWrite(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ahead := time.Now().Add(time.Hour).UnixMicro()
		for _, tc := range []struct {
			name, fence string
			above       int64 // the new token is higher
			heldAhead   bool  // the held token is ahead, and the fence key lost
		}{
			{"ahead", strconv.FormatInt(ahead, 10), ahead, false},
			{"tombstone", "1:rel|tomb-a|tomb-b", 1, false},
			{"ahead and tombstone", strconv.FormatInt(ahead, 10) + ":rel|tomb-a|tomb-b", ahead, false},
			{"held ahead", "", ahead, true},
		} {
			for _, kind := range []tokenKind{
				{"Mutex", func(c *redlatch.Client, n string) tokenHandle { return c.Mutex(n) }},
				{"FairMutex", func(c *redlatch.Client, n string) tokenHandle { return c.FairMutex(n) }},
			} {
				t.Run(kind.name+"/"+tc.name, func(t *testing.T) {
					ctx := ctxT(t, 20*time.Second)
					name := redistest.UniqueName(t)
					c, rdb, scripts := countingClient(t, b)
					holder, waiter := kind.make(c, name), kind.make(c, name)
					fence := "{" + name + "}:fence"
					require.NoError(t, holder.Lock(ctx)) // loads the lock script
					require.NoError(t, holder.Unlock(ctx))
					if tc.heldAhead {
						require.NoError(t, rdb.Set(ctx, fence, strconv.FormatInt(ahead, 10), time.Minute).Err())
					}
					require.NoError(t, holder.Lock(ctx))
					got := make(chan error, 1)
					go func() { got <- waiter.Lock(ctx) }()
					// The waiter subscribed after its failed attempt; it
					// registers for handoffs right after.
					require.Eventually(t, func() bool { return len(channels(t, b, "{"+name+"}:*")) == 1 },
						5*time.Second, 10*time.Millisecond, "the waiter never waited")
					time.Sleep(20 * time.Millisecond)
					if tc.heldAhead {
						require.NoError(t, rdb.Del(ctx, fence).Err())
					} else {
						require.NoError(t, rdb.Set(ctx, fence, tc.fence, time.Minute).Err())
					}

					held := holder.Token()
					scripts.n.Store(0)
					require.NoError(t, holder.Unlock(ctx))
					requireNoErrWithin(t, got, 5*time.Second, "the waiter takes the lock")
					require.EqualValues(t, 1, scripts.n.Load(), "a handoff: the Unlock only")
					require.Greater(t, waiter.Token(), tc.above)
					require.Greater(t, waiter.Token(), held)
					v, err := rdb.Get(ctx, fence).Result()
					require.NoError(t, err)
					require.True(t, strings.HasPrefix(v, strconv.FormatInt(waiter.Token(), 10)+":"), v)
					if strings.Contains(tc.fence, "|") {
						require.True(t, strings.HasSuffix(v, "|tomb-a|tomb-b"), v)
					} else {
						require.NotContains(t, v, "|")
					}
					require.NoError(t, waiter.Unlock(ctx))
				})
			}
		}
	})
}
