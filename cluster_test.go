package redlatch_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// blocker is one primitive seen as "hold it, have a second Client wait for
// it, release it".
type blocker struct {
	name string
	// hold takes the primitive through c and returns its release.
	hold func(ctx context.Context, c *redlatch.Client, name string) (release func() error, err error)
	// wait blocks through c until the primitive is free, then lets it go.
	wait func(ctx context.Context, c *redlatch.Client, name string) error
}

var blockers = []blocker{
	{"Mutex",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.Mutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.Mutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"ReentrantMutex",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.ReentrantMutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.ReentrantMutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"FairMutex",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.FairMutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.FairMutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"RWMutex/writer-waits-for-reader",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.RWMutex(n)
			return func() error { return m.RUnlock(ctx) }, m.RLock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.RWMutex(n)
			if err := m.Lock(ctx); err != nil {
				return err
			}
			return m.Unlock(ctx)
		}},
	{"RWMutex/reader-waits-for-writer",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			m := c.RWMutex(n)
			return func() error { return m.Unlock(ctx) }, m.Lock(ctx)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			m := c.RWMutex(n)
			if err := m.RLock(ctx); err != nil {
				return err
			}
			return m.RUnlock(ctx)
		}},
	{"Semaphore",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			s := c.Semaphore(n, 2)
			return func() error { return s.Release(ctx, 2) }, s.Acquire(ctx, 2)
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			s := c.Semaphore(n, 2)
			if err := s.Acquire(ctx, 1); err != nil {
				return err
			}
			return s.Release(ctx, 1)
		}},
	{"CountDownLatch",
		func(ctx context.Context, c *redlatch.Client, n string) (func() error, error) {
			l := c.CountDownLatch(n)
			ok, err := l.TrySetCount(ctx, 1)
			if err == nil && !ok {
				err = fmt.Errorf("latch %q already counting", n)
			}
			return func() error { return l.CountDown(ctx) }, err
		},
		func(ctx context.Context, c *redlatch.Client, n string) error {
			return c.CountDownLatch(n).Wait(ctx)
		}},
}

// TestClusterEveryPrimitive runs every primitive through a ClusterClient on
// the local 3-master cluster, on names whose slots live on each master: no
// CROSSSLOT, and a waiter on another Client is woken by (sharded) pub/sub
// within 1s of the release, against a 30s lease.
func TestClusterEveryPrimitive(t *testing.T) {
	b := clusterBackend(t)
	// Names on every master: the masters own consecutive thirds of the slots.
	names := map[int]string{}
	base := redistest.UniqueName(t)
	for i := 0; len(names) < 3; i++ {
		n := fmt.Sprintf("%s-%d", base, i)
		names[redistest.KeySlot("{"+n+"}")*3/16384] = n
	}
	for _, k := range blockers {
		for shard, name := range names {
			t.Run(fmt.Sprintf("%s/master%d", k.name, shard), func(t *testing.T) {
				ctx := ctxT(t, 30*time.Second)
				holder, waiter := newClient(t, b), newClient(t, b)
				release, err := k.hold(ctx, holder, name+"-"+k.name)
				require.NoError(t, err)
				done := make(chan error, 1)
				go func() { done <- k.wait(ctx, waiter, name+"-"+k.name) }()
				select {
				case err := <-done:
					t.Fatalf("the waiter did not wait: %v", err)
				case <-time.After(300 * time.Millisecond):
				}
				released := time.Now()
				require.NoError(t, release())
				select {
				case err := <-done:
					require.NoError(t, err)
					require.Less(t, time.Since(released), time.Second, "wake-up after the release")
				case <-time.After(10 * time.Second):
					t.Fatal("the waiter was not woken")
				}
			})
		}
	}
}

// clusterBackend returns the shared 3-master cluster, or skips the test.
func clusterBackend(t *testing.T) redistest.Backend {
	t.Helper()
	for _, b := range redistest.Backends(t) {
		if b.Cluster != nil {
			return b
		}
	}
	t.Skip("no redis-server: no local cluster")
	return redistest.Backend{}
}
