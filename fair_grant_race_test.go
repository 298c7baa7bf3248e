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

// TestFairResentTokenlessUnlockKeepsGrant: owner O's hold is released by
// a handle that tracks no hold (shared WithOwner id, token unknown). Its
// first run hands the lock to the queue head X, a waiter of the same owner
// on another Client, and publishes the grant; the reply is lost and go-redis
// resends the script. The resend must be recognised as a retry (it released
// X's grant again: no token to tell the holds apart, and the grant deleted
// the u field; X, taking the grant from the message without a round trip,
// held a lock that was free in Redis, and another owner took it too).
func TestFairResentTokenlessUnlockKeepsGrant(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const owner = "shared-owner-r4"
		rdb := b.Client(t)
		cz := newClient(t, b)
		c1, hook := lossyClient(t, b, scriptWith(owner), true)
		c2 := newClient(t, b)

		a := c1.FairMutex(name, redlatch.WithOwner(owner))
		bb := c1.FairMutex(name, redlatch.WithOwner(owner))
		x := c2.FairMutex(name, redlatch.WithOwner(owner))
		// Load the scripts (a NOSCRIPT reply would spend the hook).
		require.NoError(t, bb.Lock(ctx))
		require.NoError(t, bb.Unlock(ctx))

		z := cz.FairMutex(name)
		require.NoError(t, z.Lock(ctx))
		aErr := make(chan error, 1)
		go func() { aErr <- a.Lock(ctx) }()
		waitQueued(t, rdb, name, 1)
		xErr := make(chan error, 1)
		go func() { xErr <- x.Lock(ctx) }()
		waitQueued(t, rdb, name, 2)

		require.NoError(t, z.Unlock(ctx))
		require.NoError(t, <-aErr) // A holds (owner O), X (owner O) queued

		hook.armed.Store(true)
		require.NoError(t, bb.Unlock(ctx)) // O's one hold released once, reply lost, resent
		require.False(t, hook.armed.Load(), "the Unlock was resent")
		// The first run handed the lock to X (owner O): the resend must leave
		// that grant alone.
		h := rdb.HGetAll(ctx, fairKey(name)).Val()
		if h["o"] != owner || h["c"] != "1" {
			t.Errorf("the resent Unlock released X's grant as well: hash now %v", h)
		}
		requireNoErrWithin(t, xErr, 5*time.Second, "X did not get the lock")
		require.Positive(t, x.Token())

		n, err := x.HoldCount(ctx)
		require.NoError(t, err)
		other := cz.FairMutex(name)
		ok, err := other.TryLock(ctx)
		require.NoError(t, err)
		if ok {
			select {
			case <-x.Lost():
			default:
				t.Errorf("two holders: X holds token %d (Lost open, HoldCount in Redis %d) and another owner took the lock with token %d",
					x.Token(), n, other.Token())
			}
			_ = other.Unlock(ctx)
		}
		_ = n
	})
}

// gateAttemptHook holds the next blocking FairMutex attempt ("w" mode) once
// armed: it reports the attempt started, then waits for open before sending
// it, as a request that waits for a pool connection or sits in a slow link.
type gateAttemptHook struct {
	passHook
	armed   atomic.Bool
	started chan struct{}
	open    chan struct{}
}

func (h *gateAttemptHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		a := cmd.Args()
		if (cmd.Name() == "evalsha" || cmd.Name() == "eval") && a[len(a)-1] == "w" && h.armed.CompareAndSwap(true, false) {
			close(h.started)
			<-h.open
		}
		return next(ctx, cmd)
	}
}

// TestFairStaleGrantAfterRequeue: waiter X's attempt is delayed on
// the client side (pool wait, slow link) past its grant's lifetime. The
// grant message arrived meanwhile; the grant expired and went to Y; X's
// late attempt finds Y holding and queues X again at the tail. X must not
// take the stale grant from the message (its Lock returned nil while Y
// held the lock: two owners): a waiter queued again claims grants with an
// attempt.
func TestFairStaleGrantAfterRequeue(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if !b.Real() {
			t.Skip("needs keys that expire on the server's clock")
		}
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		ca := newClient(t, b)
		xrdb := b.Client(t)
		gate := &gateAttemptHook{started: make(chan struct{}), open: make(chan struct{})}
		xrdb.AddHook(gate)
		cx := newClientOn(t, xrdb, redlatch.WithWatchdogTimeout(600*time.Millisecond))

		h := ca.FairMutex(name)
		require.NoError(t, h.Lock(ctx))
		x := cx.FairMutex(name)
		xErr := make(chan error, 1)
		go func() { xErr <- x.Lock(ctx) }()
		waitQueued(t, rdb, name, 1)
		y := ca.FairMutex(name)
		yErr := make(chan error, 1)
		go func() { yErr <- y.Lock(ctx) }()
		waitQueued(t, rdb, name, 2)

		gate.armed.Store(true)
		<-gate.started                    // X's next check is on its way
		require.NoError(t, h.Unlock(ctx)) // grant to X, message delivered to X
		requireNoErrWithin(t, yErr, 5*time.Second, "Y did not get the lock after X's grant expired")
		close(gate.open) // X's attempt arrives: Y holds, X queues again

		select {
		case err := <-xErr:
			require.NoError(t, err)
			t.Errorf("two holders: X took token %d from the stale message (Lost closed: %v) while Y holds token %d",
				x.Token(), isClosedChan(x.Lost()), y.Token())
			_ = x.Unlock(ctx)
			require.NoError(t, y.Unlock(ctx))
			return
		case <-time.After(500 * time.Millisecond):
			// X waits its turn behind Y, as it should.
		}
		require.NoError(t, y.Unlock(ctx))
		requireNoErrWithin(t, xErr, 5*time.Second, "X never got the lock")
		require.NoError(t, x.Unlock(ctx))
	})
}

func isClosedChan(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
