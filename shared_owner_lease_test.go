package redlatch_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestSharedOwnerLeaseNotShortened: two handles share an owner id, one with
// a fixed 5 s lease, the other renewed by a 900 ms watchdog. The renewed
// one re-enters, is renewed, and leaves: neither its re-entry nor its
// renewals may shorten the lease the fixed handle still holds on, or another
// owner takes the lock while the fixed handle holds it (2 s into its 5 s
// lease, Lost open).
func TestSharedOwnerLeaseNotShortened(t *testing.T) {
	type lockFns struct {
		lock, unlock func(context.Context) error
		lost         func() <-chan struct{}
		tryLock      func(context.Context) (bool, error)
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c := newClient(t, b, redlatch.WithWatchdogTimeout(900*time.Millisecond))
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, tc := range []struct {
				kind string
				make func(name string, opts ...redlatch.LockOption) lockFns
			}{
				{"ReentrantMutex", func(name string, opts ...redlatch.LockOption) lockFns {
					m := c.ReentrantMutex(name, opts...)
					return lockFns{m.Lock, m.Unlock, m.Lost, m.TryLock}
				}},
				{"FairMutex", func(name string, opts ...redlatch.LockOption) lockFns {
					m := c.FairMutex(name, opts...)
					return lockFns{m.Lock, m.Unlock, m.Lost, m.TryLock}
				}},
				{"RWMutex", func(name string, opts ...redlatch.LockOption) lockFns {
					m := c.RWMutex(name, opts...)
					return lockFns{m.Lock, m.Unlock, m.Lost, m.TryLock}
				}},
				{"RWMutexRead", func(name string, opts ...redlatch.LockOption) lockFns {
					m := c.RWMutex(name, opts...)
					return lockFns{m.RLock, m.RUnlock, m.RLost, m.TryLock}
				}},
			} {
				run(tc.kind, func(t *testing.T) {
					name := redistest.UniqueName(t)
					fixed := tc.make(name, redlatch.WithOwner("svc"), redlatch.WithLease(5*time.Second))
					renewed := tc.make(name, redlatch.WithOwner("svc"))
					require.NoError(t, fixed.lock(ctx))
					require.NoError(t, renewed.lock(ctx))   // a re-entry
					time.Sleep(500 * time.Millisecond)      // renewed at least once
					require.NoError(t, renewed.unlock(ctx)) // the fixed handle still holds
					time.Sleep(1500 * time.Millisecond)
					requireOpen(t, fixed.lost(), "Lost of the fixed handle")
					other := tc.make(name) // another owner: a writer
					ok, err := other.tryLock(ctx)
					require.NoError(t, err)
					if ok {
						_ = other.unlock(ctx)
					}
					require.False(t, ok, "another owner got in while the fixed handle holds (2 s into its 5 s lease)")
					require.NoError(t, fixed.unlock(ctx))
				})
			}
		})
	})
}

// TestReentryRestartsLease: a WithLease handle re-enters near the end of its
// lease; the script gives the hold its full lease again, and so does the
// handle: Lost stays open and both Unlocks succeed while Redis holds it.
// (Found by a reviewer on RWMutex: Lost closed at the first lease's end,
// and the last Unlock returned ErrNotHeld although it released a live hold.)
func TestReentryRestartsLease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		c := newClient(t, b)
		// Margins of 500ms and more: the subtests run at once, and a loaded
		// machine (two CPU hogs) missed margins of 200ms.
		const lease = 1500 * time.Millisecond
		redistest.Together(t, func(run func(string, func(*testing.T))) {
			for _, tc := range []struct {
				kind string
				make func(name string) (lock, unlock func(context.Context) error, lost func() <-chan struct{})
			}{
				{"ReentrantMutex", func(name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}) {
					m := c.ReentrantMutex(name, redlatch.WithLease(lease))
					return m.Lock, m.Unlock, m.Lost
				}},
				{"FairMutex", func(name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}) {
					m := c.FairMutex(name, redlatch.WithLease(lease))
					return m.Lock, m.Unlock, m.Lost
				}},
				{"RWMutex", func(name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}) {
					m := c.RWMutex(name, redlatch.WithLease(lease))
					return m.Lock, m.Unlock, m.Lost
				}},
				{"RWMutexRead", func(name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}) {
					m := c.RWMutex(name, redlatch.WithLease(lease))
					return m.RLock, m.RUnlock, m.RLost
				}},
			} {
				run(tc.kind, func(t *testing.T) {
					lock, unlock, lost := tc.make(redistest.UniqueName(t))
					require.NoError(t, lock(ctx))
					time.Sleep(1000 * time.Millisecond)
					require.NoError(t, lock(ctx)) // held in Redis until about 2500 ms
					time.Sleep(750 * time.Millisecond)
					requireOpen(t, lost(), "Lost, while Redis holds the lock for the owner")
					require.NoError(t, unlock(ctx))
					require.NoError(t, unlock(ctx), "the last Unlock released a live hold")
				})
			}
		})
	})
}
