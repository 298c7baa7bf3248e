package redlatch

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestWakeHeldBackDuringTransfer: a plain wake-up that arrives while an
// Unlock of this Client is handing the lock to one of its waiters is stale
// (this Client holds the lock) and wakes no one; it is passed on when the
// Unlock ends without a transfer, and dropped when the transfer is
// delivered.
func TestWakeHeldBackDuringTransfer(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := New(b.Client(t))
		t.Cleanup(func() { _ = c.Close() })
		channel := "{" + redistest.UniqueName(t) + "}:wake"
		var ws []*waiter
		for range 2 {
			w, err := c.ps.join(ctx, channel, time.Minute)
			require.NoError(t, err)
			c.ps.setTransfer(w, &transfer{owner: "o"}, nil)
			ws = append(ws, w)
		}
		t.Cleanup(func() {
			for _, w := range ws {
				w.leave(false)
			}
		})
		signalled := func() []bool {
			var got []bool
			for _, w := range ws {
				select {
				case <-w.sig:
					got = append(got, true)
				default:
					got = append(got, false)
				}
			}
			return got
		}

		// The Unlock ends without a transfer: the wake-up goes on.
		r, waiting := c.ps.reserveLocal(channel, true)
		require.True(t, waiting)
		require.Same(t, ws[0], r)
		c.ps.dispatch(channel, wakeOne)
		require.Equal(t, []bool{false, false}, signalled(), "held back during the transfer")
		c.ps.unreserve(r, false)
		require.Equal(t, []bool{true, false}, signalled(), "passed on after it")

		// The transfer is delivered: the wake-up is dropped.
		r, _ = c.ps.reserveLocal(channel, true)
		c.ps.dispatch(channel, wakeOne)
		require.True(t, c.ps.deliver(r, 42, time.Now()))
		require.Equal(t, []bool{r == ws[0], r == ws[1]}, signalled(), "only the delivery")
		tok, _ := r.takeTransfer()
		require.EqualValues(t, 42, tok)
		r, _ = c.ps.reserveLocal(channel, true)
		c.ps.unreserve(r, false)
		require.Equal(t, []bool{false, false}, signalled(), "nothing held back any more")
	})
}

// TestYieldFallbackSkippedWhenTaken: after a public release that other
// Clients heard, this Client's waiters sit out for yieldDelay, then one is
// woken in case no one else took the lock; not when one of this Client's
// own waiters has taken it meanwhile (as Client.acquire records).
func TestYieldFallbackSkippedWhenTaken(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := New(b.Client(t))
		t.Cleanup(func() { _ = c.Close() })
		channel := "{" + redistest.UniqueName(t) + "}:wake"
		w, err := c.ps.join(ctx, channel, time.Minute)
		require.NoError(t, err)
		t.Cleanup(func() { w.leave(false) })

		c.ps.yieldNext(channel)
		c.ps.dispatch(channel, wakeOne) // this Client's own release: skipped
		select {
		case <-w.sig:
			t.Fatal("the waiter did not sit out its own Client's release")
		case <-time.After(yieldDelay / 2):
		}
		select {
		case <-w.sig:
		case <-time.After(time.Second):
			t.Fatal("no fallback wake-up after the yield")
		}

		c.ps.yieldNext(channel)
		c.ps.mu.Lock()
		w.ch.taken = true // a waiter of this Client took the lock
		c.ps.mu.Unlock()
		select {
		case <-w.sig:
			t.Fatal("a fallback wake-up though this Client holds the lock")
		case <-time.After(5 * yieldDelay):
		}
	})
}
