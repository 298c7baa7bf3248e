package redlatch

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestTombstonesKept: the fence key keeps the tombstones of the last
// tombstonesKept undone acquisitions of a name, so that several late
// requests are all refused, and it matches request ids whole (one may be a
// prefix of another). The undos here run before their acquisitions reach
// Redis, as when a request is stuck in a slow link while its caller gives
// up (TestLateAcquisitionAfterUndo drives that through a proxy).
func TestTombstonesKept(t *testing.T) {
	const tombstonesKept = 8 // lua/fence.lua
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := New(b.Client(t))
		t.Cleanup(func() { _ = c.Close() })
		e := newExcl(c, redistest.UniqueName(t), false, []LockOption{WithLease(time.Minute)})

		reqs := make([]string, tombstonesKept+1)
		for i := range reqs {
			reqs[i] = "late-" + strconv.Itoa(i+1) // late-1 is a prefix of late-10
			n, err := e.unlock(ctx, reqs[i], 0, false)
			require.NoError(t, err)
			require.EqualValues(t, -1, n, "nothing to undo")
		}
		// The oldest tombstone was dropped; every later one refuses its request.
		for _, req := range reqs[1:] {
			ok, _, _, _, err := e.attempt(ctx, req)
			require.NoError(t, err)
			require.False(t, ok, "%s took the lock after its undo", req)
		}
		ok, _, _, _, err := e.attempt(ctx, "late-1")
		require.NoError(t, err)
		require.True(t, ok, "late-1's tombstone was the oldest: dropped")
		n, err := e.unlock(ctx, "", 0, false)
		require.NoError(t, err)
		require.Zero(t, n)
		// A release keeps the tombstones.
		ok, _, _, _, err = e.attempt(ctx, reqs[tombstonesKept])
		require.NoError(t, err)
		require.False(t, ok, "the release dropped the tombstones")
	})
}
