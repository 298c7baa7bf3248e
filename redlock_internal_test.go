package redlatch

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestRedlockUnlockAfterValidityClosesLost: an Unlock that finds the
// validity over before the hold's own check has run (its timer late, or a
// quorum's Clients closed a moment before; here the timer is stopped)
// returns ErrNotHeld, and closes the Lost channel its holder has: it stayed
// open for ever, as Unlock ended the watch first. (Found by a reviewer.)
func TestRedlockUnlockAfterValidityClosesLost(t *testing.T) {
	var clients []*Client
	for range 3 {
		c := New(redistest.NewServer(t).Client(t))
		t.Cleanup(func() { _ = c.Close() })
		clients = append(clients, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := NewRedlock(redistest.UniqueName(t), clients, WithLease(time.Minute))
	require.NoError(t, r.Lock(ctx))
	lost := r.Lost()
	r.mu.Lock()
	h := r.h
	r.mu.Unlock()
	h.mu.Lock()
	h.timer.Stop()                            // the check that would close Lost is late
	h.end = time.Now().Add(-time.Millisecond) // and the validity is over
	h.mu.Unlock()
	require.ErrorIs(t, r.Unlock(ctx), ErrNotHeld)
	select {
	case <-lost:
	default:
		t.Fatal("Unlock reported the hold lost, and Lost stays open")
	}
}
