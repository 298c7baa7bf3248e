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
	const tombstonesKept = 32 // lua/fence_release.lua
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
			ok, _, _, err := e.attempt(ctx, req)
			require.NoError(t, err)
			require.False(t, ok, "%s took the lock after its undo", req)
		}
		ok, _, _, err := e.attempt(ctx, "late-1")
		require.NoError(t, err)
		require.True(t, ok, "late-1's tombstone was the oldest: dropped")
		n, err := e.unlock(ctx, "", 0, false)
		require.NoError(t, err)
		require.Zero(t, n)
		// A release keeps the tombstones.
		ok, _, _, err = e.attempt(ctx, reqs[tombstonesKept])
		require.NoError(t, err)
		require.False(t, ok, "the release dropped the tombstones")
	})
}

// TestTombstonesKeptShared: the primitives of one name share its fence key,
// and a semaphore record ("<owner>|<request id>|<n>", the owner id may hold
// '|') takes one tombstone slot like any request: a Mutex undo followed by
// semaphore undos stays refused, and so do the semaphore records.
func TestTombstonesKeptShared(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := New(b.Client(t))
		t.Cleanup(func() { _ = c.Close() })
		name := redistest.UniqueName(t)
		e := newExcl(c, name, false, []LockOption{WithLease(time.Minute)})
		s := c.Semaphore(name, 3, WithOwner("a|b"), WithLease(time.Minute))

		n, err := e.unlock(ctx, "late-mutex", 0, false)
		require.NoError(t, err)
		require.EqualValues(t, -1, n)
		var records []string
		for i := range 4 {
			member := s.owner + "|late-sem-" + strconv.Itoa(i) + "|1"
			records = append(records, member)
			_, err := s.releaseRecords(ctx, newID(), "", []string{member}, "", "", true)
			require.NoError(t, err)
		}
		ok, _, _, err := e.attempt(ctx, "late-mutex")
		require.NoError(t, err)
		require.False(t, ok, "the Mutex tombstone was pushed out by semaphore records")
		for _, member := range records {
			res, err := semAcquireScript.Run(ctx, c.rdb, []string{s.key, s.fence}, member, 1, 3, 60000).Int64Slice()
			require.NoError(t, err)
			require.Zero(t, res[0], "%s took permits after its undo", member)
		}
	})
}
