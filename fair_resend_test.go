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

// TestFairResentForceUnlockKeepsGrant: one ForceUnlock, with two waiters
// queued, whose reply is lost and which go-redis resends. The first run
// releases the holder and hands the lock to the head W1; the resend must be
// recognised as the same call, not release W1's grant and hand the lock to
// W2 as well (W1 takes its grant from the message, without a round trip:
// both would hold until W1's next renewal).
func TestFairResentForceUnlockKeepsGrant(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		cf, hook := lossyClient(t, b, scriptWith(fairKey(name)), true)
		forcer := cf.FairMutex(name)
		// Load the script (a NOSCRIPT reply would spend the hook).
		_, err := forcer.ForceUnlock(ctx)
		require.NoError(t, err)

		holder := newClient(t, b).FairMutex(name)
		require.NoError(t, holder.Lock(ctx))
		w1 := newClient(t, b).FairMutex(name)
		w1Err := make(chan error, 1)
		go func() { w1Err <- w1.Lock(ctx) }()
		waitQueued(t, rdb, name, 1)
		w2 := newClient(t, b).FairMutex(name)
		w2Err := make(chan error, 1)
		go func() { w2Err <- w2.Lock(ctx) }()
		waitQueued(t, rdb, name, 2)

		hook.armed.Store(true)
		ok, err := forcer.ForceUnlock(ctx)
		require.NoError(t, err)
		require.True(t, ok)
		require.False(t, hook.armed.Load(), "the ForceUnlock was resent")

		requireNoErrWithin(t, w1Err, 5*time.Second, "W1, the queue head, did not get the lock")
		select {
		case err := <-w2Err:
			require.NoError(t, err)
			select {
			case <-w1.Lost():
				t.Errorf("the resent ForceUnlock released W1's grant: W1 lost it")
			default:
				t.Errorf("two holders: W1 (token %d, Lost open) and W2 (token %d)", w1.Token(), w2.Token())
			}
			_ = w2.Unlock(ctx)
		case <-time.After(500 * time.Millisecond):
			// W2 still waits for W1, as it should.
		}
		require.NoError(t, w1.Unlock(ctx))
		select {
		case err := <-w2Err:
			require.NoError(t, err)
			require.NoError(t, w2.Unlock(ctx))
		case <-time.After(5 * time.Second):
		}
		requireNoFairKeys(t, b, name)
	})
}

// TestFairHandoffKeepsFixedLease: a WithLease waiter that claims a handoff
// holds the lock for its own lease, as when it takes a free lock, not for
// what remained of its queue place (up to its Client's watchdog timeout,
// 30s here): when the holder never unlocks (it crashed), the lock is free
// again once the fixed lease has run out.
func TestFairHandoffKeepsFixedLease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const lease = 300 * time.Millisecond
		rdb := b.Client(t)
		holder := newClient(t, b).FairMutex(name)
		require.NoError(t, holder.Lock(ctx))
		w := newClient(t, b).FairMutex(name, redlatch.WithLease(lease))
		got := make(chan error, 1)
		go func() { got <- w.Lock(ctx) }()
		waitQueued(t, rdb, name, 1)
		require.NoError(t, holder.Unlock(ctx))
		requireNoErrWithin(t, got, 5*time.Second, "the waiter did not get the lock")

		ttl, err := w.TTL(ctx)
		require.NoError(t, err)
		require.LessOrEqual(t, ttl, lease, "the handoff's lease is the waiter's fixed lease")
		// W never unlocks: the lock is free once its lease has run out.
		next := newClient(t, b).FairMutex(name)
		lctx, cancel := context.WithTimeout(ctx, lease+3*time.Second)
		defer cancel()
		require.NoError(t, next.Lock(lctx), "the lock stayed held past the fixed lease")
		require.NoError(t, next.Unlock(ctx))
	})
}

// withdrawResendHook acts on the script calls of one owner: the first
// (an attempt) runs, then before its reply is "lost" (an error) runs
// during; the second (the withdrawal that undoes the attempt) runs twice,
// as go-redis resends a script whose reply was lost.
type withdrawResendHook struct {
	passHook
	owner  string
	during func()
	calls  atomic.Int32
}

func (h *withdrawResendHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !scriptWith(h.owner)(cmd) {
			return next(ctx, cmd)
		}
		switch h.calls.Add(1) {
		case 1:
			if err := next(ctx, cmd); err != nil {
				return err
			}
			h.during()
			cmd.SetErr(io.ErrUnexpectedEOF)
			return io.ErrUnexpectedEOF
		case 2:
			if err := next(ctx, cmd); err != nil {
				return err
			}
			return next(ctx, cmd) // the reply was lost: resent
		}
		return next(ctx, cmd)
	}
}

// TestFairResentWithdrawalReportsGrant: an acquisition whose reply is lost
// is undone by a withdrawal, which releases the hold the attempt took and
// hands the lock to the queue head W, a waiter of the same Client: the grant
// is delivered in-process, unpublished. When the withdrawal's own reply is
// lost and go-redis resends it, the resend must report that grant again (as
// a resent Unlock does), or W sleeps on a lock handed to it until its next
// check, a third of its watchdog timeout (10s) later.
func TestFairResentWithdrawalReportsGrant(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const owner = "withdrawn-owner-r1"
		rdb := b.Client(t)
		crdb := b.Client(t)
		c := newClientOn(t, crdb)
		m := c.FairMutex(name, redlatch.WithOwner(owner))
		// Load the scripts first (a NOSCRIPT reply would confuse the hook).
		require.NoError(t, m.Lock(ctx))
		require.NoError(t, m.Unlock(ctx))

		w := c.FairMutex(name)
		wErr := make(chan error, 1)
		hook := &withdrawResendHook{owner: owner, during: func() {
			// The TryLock took the free lock; its reply is about to be lost.
			// W queues behind it and falls asleep.
			go func() { wErr <- w.Lock(ctx) }()
			waitQueued(t, rdb, name, 1)
			time.Sleep(200 * time.Millisecond)
		}}
		crdb.AddHook(hook)

		ok, err := m.TryLock(ctx)
		require.Error(t, err)
		require.False(t, ok)
		require.EqualValues(t, 2, hook.calls.Load(), "the attempt and its withdrawal")
		requireNoErrWithin(t, wErr, 3*time.Second,
			"W, handed the lock by the resent withdrawal, did not learn of it")
		require.NoError(t, w.Unlock(ctx))
		requireNoFairKeys(t, b, name)
	})
}
