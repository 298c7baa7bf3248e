package redlatch_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestQueuedWaiterWokenAtExpiry: a waiter queued behind a waiter of its own
// Client (no attempt of its own, so no remaining lease to sleep on) takes
// the lock soon after the hold that waiter took runs out of its fixed
// lease, not at its default bound of a third of the watchdog timeout.
func TestQueuedWaiterWokenAtExpiry(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b)
		const lease = 300 * time.Millisecond
		first := c.Mutex(name, redlatch.WithLease(lease))
		require.NoError(t, first.Lock(ctx))
		second := c.Mutex(name, redlatch.WithLease(lease))
		third := c.Mutex(name, redlatch.WithLease(lease))
		got2, got3 := make(chan time.Time, 1), make(chan time.Time, 1)
		go func() {
			if second.Lock(ctx) == nil {
				got2 <- time.Now()
			}
		}()
		time.Sleep(50 * time.Millisecond) // second attempts and sleeps first
		go func() {
			if third.Lock(ctx) == nil {
				got3 <- time.Now()
			}
		}()
		// Nobody unlocks: first's lease runs out, second takes the lock,
		// and its lease runs out too.
		var t2 time.Time
		select {
		case t2 = <-got2:
		case <-time.After(3 * time.Second):
			t.Fatal("second waiter not woken at the first hold's expiry")
		}
		select {
		case t3 := <-got3:
			t.Logf("third took the lock %v after second", t3.Sub(t2))
		case <-time.After(3 * time.Second):
			t.Fatal("third waiter not woken at the second hold's expiry")
		}
	})
}
