package redlatch_test

import (
	"context"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestSemPartialReleaseUnknownOutcome: a Release of part of a record
// (Acquire(3), Release(1)) whose outcome is unknown (here its ctx is
// cancelled already, so it never reached Redis) is sent again with a fresh
// bounded context: Redis applies it once, and the 2 permits kept exist
// under their new record. (Without the resend, the first renewal found the
// new record missing, Lost closed, the 2 permits could not be released,
// and the old 3-permit record stayed in Redis until its lease ran out.)
func TestSemPartialReleaseUnknownOutcome(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const wd = 600 * time.Millisecond
		c := newClient(t, b, redlatch.WithWatchdogTimeout(wd))
		s := c.Semaphore(name, 3)
		require.NoError(t, s.Acquire(ctx, 3))
		lost := s.Lost()

		cancelled, cancel := context.WithCancel(ctx)
		cancel()
		t.Logf("Release(cancelled ctx, 1): %v", s.Release(cancelled, 1)) // never reaches Redis

		time.Sleep(wd) // a few renewals
		requireOpen(t, lost, "the 2 permits Release kept were reported lost")
		require.NoError(t, s.Release(ctx, 2), "the 2 permits Release kept cannot be released")
	})
}

// renewHook makes every renewal of the permit set key (a renew.lua call:
// its args hold the key and the kind "z") run on the server but lose its
// reply, while armed.
type renewHook struct {
	key   string
	armed atomic.Bool
}

func (h *renewHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *renewHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *renewHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.armed.Load() || (cmd.Name() != "evalsha" && cmd.Name() != "eval") {
			return next(ctx, cmd)
		}
		key, z := false, false
		for _, a := range cmd.Args() {
			if v, ok := a.(string); ok {
				key = key || v == h.key
				z = z || v == "z"
			}
		}
		if !key || !z {
			return next(ctx, cmd)
		}
		if err := next(ctx, cmd); err != nil {
			return err
		}
		cmd.SetErr(io.ErrUnexpectedEOF) // ran on the server, reply lost
		return io.ErrUnexpectedEOF
	}
}

// TestSemReleaseRemovesLostPermits: renewals reach Redis but their replies
// are lost (a slow or flaky link) until the local deadline passes: Lost
// closes, although Redis kept renewing the record. Release reports
// ErrNotHeld, and removes the record from Redis all the same (it was
// unique to that acquisition), so that the permit is free at once instead
// of after up to a whole lease, as a Mutex's Unlock does.
func TestSemReleaseRemovesLostPermits(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const wd = 3 * time.Second
		rdb := b.Client(t)
		hook := &renewHook{key: semKey(name)}
		rdb.AddHook(hook)
		c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(wd))
		t.Cleanup(func() { _ = c.Close() })
		s := c.Semaphore(name, 1)
		other := newClient(t, b).Semaphore(name, 1)

		require.NoError(t, s.Acquire(ctx, 1))
		hook.armed.Store(true)
		requireClosedWithin(t, s.Lost(), 2*wd, "Lost")
		hook.armed.Store(false)
		require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrNotHeld)

		ttl, err := b.Client(t).PTTL(ctx, semKey(name)).Result()
		require.NoError(t, err)
		t.Logf("permit set PTTL after Release: %v", ttl)
		ok, err := other.TryAcquire(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok, "the lost permit is still taken in Redis after its handle's Release")
		require.NoError(t, other.Release(ctx, 1))
	})
}
