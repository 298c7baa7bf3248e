package redlatch_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestKeyPrefix: WithKeyPrefix is prepended to every key and channel of
// every primitive, so that "app:*" matches them all (ACL key and channel
// patterns, SCAN), while the name stays the hash tag: every primitive works
// on a cluster. A prefix with braces, which would change the hash tag, is
// refused.
func TestKeyPrefix(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		const prefix = "app:"
		c := newClient(t, b, redlatch.WithKeyPrefix(prefix))
		m := c.ReentrantMutex(name + "-m")
		f := c.FairMutex(name + "-f")
		rw := c.RWMutex(name + "-rw")
		sem := c.Semaphore(name+"-s", 2)
		l := c.CountDownLatch(name + "-l")
		require.NoError(t, m.Lock(ctx))
		require.NoError(t, f.Lock(ctx))
		require.NoError(t, rw.RLock(ctx))
		require.NoError(t, sem.Acquire(ctx, 1))
		ok, err := l.TrySetCount(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok)

		// A waiter of another Client: its channel carries the prefix too.
		waiter := newClient(t, b, redlatch.WithKeyPrefix(prefix)).ReentrantMutex(name + "-m")
		got := make(chan error, 1)
		go func() { got <- waiter.Lock(ctx) }()
		var channels []string
		require.Eventually(t, func() bool {
			channels = channels[:0]
			for _, node := range b.NodeClients(t) {
				for _, cmd := range []string{"CHANNELS", "SHARDCHANNELS"} {
					if b.Mini != nil && cmd == "SHARDCHANNELS" {
						continue
					}
					chs, err := node.Do(ctx, "PUBSUB", cmd, "*"+name+"*").StringSlice()
					require.NoError(t, err)
					channels = append(channels, chs...)
				}
			}
			return len(channels) > 0
		}, 5*time.Second, 10*time.Millisecond, "the waiter did not subscribe")
		var keys []string
		for _, node := range b.NodeClients(t) {
			ks, _, err := node.Scan(ctx, 0, "*"+name+"*", 1000).Result()
			require.NoError(t, err)
			keys = append(keys, ks...)
		}
		require.GreaterOrEqual(t, len(keys), 5, "keys: %v", keys)
		for _, k := range append(keys, channels...) {
			require.True(t, strings.HasPrefix(k, prefix+"{"+name), "%q does not start with the prefix", k)
		}

		require.NoError(t, m.Unlock(ctx))
		require.NoError(t, <-got)
		require.NoError(t, waiter.Unlock(ctx))
		require.NoError(t, f.Unlock(ctx))
		require.NoError(t, rw.RUnlock(ctx))
		require.NoError(t, sem.Release(ctx, 1))
		require.NoError(t, l.CountDown(ctx))
		require.NoError(t, l.Wait(ctx))
	})

	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"}) // never dialled
	t.Cleanup(func() { _ = rdb.Close() })
	bad := redlatch.New(rdb, redlatch.WithKeyPrefix("a{b}:"))
	err := bad.Mutex("x").Lock(t.Context())
	require.ErrorIs(t, err, redlatch.ErrInvalidArgument)
	require.ErrorContains(t, err, "key prefix")
}

// oddNames are lock names with the characters the key layout and the
// scripts use as separators ('{', '}', ':', '|', ' ', ','), a newline,
// unicode and 10 KB: each is a name of its own, whose keys share one slot.
func oddNames(base string) []string {
	return []string{
		base + "}x",
		"a{" + base + "}b}c",
		base + ":lock",
		base + " sp ace,x",
		base + "\nnl",
		base + "|p|1|2|",
		base + "-ключ🔒",
		base + "%s*?[x]\x00z",
		base + strings.Repeat("L", 10<<10),
	}
}

// oddOwners are WithOwner ids with the separators of queue members, permit
// records, request id lists and RWMutex fields.
var oddOwners = []string{"o|1|2|c|d", "o w:n e,r", "re:x|1", "#", "~x", "%d\x00.*"}

// TestOddNamesAndOwners: every primitive works under names and owner ids
// holding separators, newlines, unicode, or 10 KB: contended holds are
// handed on by pub/sub (a waiter of another Client wakes at once), all
// keys of a name land in one cluster slot, and nothing but the fence key
// is left after the last release.
func TestOddNamesAndOwners(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 120*time.Second)
		base := redistest.UniqueName(t)
		c1 := newClient(t, b, redlatch.WithKeyPrefix("p:"))
		c2 := newClient(t, b, redlatch.WithKeyPrefix("p:"))
		wake := func(got <-chan error, what string) {
			t.Helper()
			requireNoErrWithin(t, got, 3*time.Second, what+": waiter not woken")
		}
		for i, name := range oddNames(base) {
			owner := oddOwners[i%len(oddOwners)]
			short := name
			if len(short) > 40 {
				short = short[:40]
			}
			t.Logf("name %q owner %q", short, owner)

			m1 := c1.Mutex(name, redlatch.WithOwner(owner))
			m2 := c2.ReentrantMutex(name, redlatch.WithOwner(owner+"2"))
			require.NoError(t, m1.Lock(ctx))
			got := make(chan error, 1)
			go func() { got <- m2.Lock(ctx) }()
			time.Sleep(50 * time.Millisecond)
			require.NoError(t, m1.Unlock(ctx))
			wake(got, "Mutex")
			require.NoError(t, m2.Unlock(ctx))

			f1 := c1.FairMutex(name, redlatch.WithOwner(owner))
			f2 := c2.FairMutex(name, redlatch.WithOwner(owner+"2"))
			require.NoError(t, f1.Lock(ctx))
			require.NoError(t, f1.Lock(ctx))
			n, err := f1.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, 2, n)
			go func() { got <- f2.Lock(ctx) }()
			time.Sleep(50 * time.Millisecond)
			require.NoError(t, f1.Unlock(ctx))
			require.NoError(t, f1.Unlock(ctx))
			wake(got, "FairMutex")
			n, err = f2.HoldCount(ctx)
			require.NoError(t, err)
			require.Equal(t, 1, n, "the grant went to another owner id")
			require.NoError(t, f2.Unlock(ctx))

			// ForceUnlock wakes the waiter of another Client.
			require.NoError(t, m1.Lock(ctx))
			go func() { got <- m2.Lock(ctx) }()
			time.Sleep(50 * time.Millisecond)
			ok, err := c2.Mutex(name).ForceUnlock(ctx)
			require.NoError(t, err)
			require.True(t, ok)
			wake(got, "ForceUnlock")
			require.NoError(t, m2.Unlock(ctx))
			require.ErrorIs(t, m1.Unlock(ctx), redlatch.ErrNotHeld)

			if b.Cluster == nil {
				r := redlatch.NewRedlock(name, []*redlatch.Client{c1}, redlatch.WithOwner(owner))
				require.NoError(t, r.Lock(ctx))
				ok, err = c2.Mutex(name).TryLock(ctx)
				require.NoError(t, err)
				require.False(t, ok)
				require.NoError(t, r.Unlock(ctx))
			}

			rw1 := c1.RWMutex(name, redlatch.WithOwner(owner))
			rw2 := c2.RWMutex(name, redlatch.WithOwner(owner+"2"))
			require.NoError(t, rw1.RLock(ctx))
			require.NoError(t, rw1.RLock(ctx))
			go func() { got <- rw2.Lock(ctx) }() // waits for rw1's read hold
			time.Sleep(50 * time.Millisecond)
			require.NoError(t, rw1.RUnlock(ctx))
			require.NoError(t, rw1.RUnlock(ctx))
			wake(got, "RWMutex writer")
			go func() { got <- rw1.RLock(ctx) }()
			time.Sleep(50 * time.Millisecond)
			require.NoError(t, rw2.Unlock(ctx))
			wake(got, "RWMutex reader")
			require.NoError(t, rw1.RUnlock(ctx))

			s1 := c1.Semaphore(name, 1, redlatch.WithOwner(owner))
			s2 := c2.Semaphore(name, 1, redlatch.WithOwner(owner))
			require.NoError(t, s1.Acquire(ctx, 1))
			go func() { got <- s2.Acquire(ctx, 1) }()
			time.Sleep(50 * time.Millisecond)
			require.NoError(t, s1.Release(ctx, 1))
			wake(got, "Semaphore")
			require.ErrorIs(t, s1.Release(ctx, 1), redlatch.ErrNotHeld)
			require.NoError(t, s2.Release(ctx, 1))
			av, err := s1.Available(ctx)
			require.NoError(t, err)
			require.Equal(t, int64(1), av)

			l := c1.CountDownLatch(name)
			ok, err = l.TrySetCount(ctx, 1)
			require.NoError(t, err)
			require.True(t, ok)
			go func() { got <- c2.CountDownLatch(name).Wait(ctx) }()
			time.Sleep(50 * time.Millisecond)
			require.NoError(t, l.CountDown(ctx))
			wake(got, "CountDownLatch")

			// Every key of the name, in one slot; only the fence key stays.
			var keys []string
			slots := map[int64]bool{}
			for _, node := range b.NodeClients(t) {
				var cursor uint64
				for {
					ks, next, err := node.Scan(ctx, cursor, "p:*", 1000).Result()
					require.NoError(t, err)
					for _, k := range ks {
						if strings.HasPrefix(k, "p:{"+name+"}") && !strings.Contains(k[len("p:{"+name+"}"):], "}") {
							keys = append(keys, k)
							if b.Cluster != nil {
								s, err := node.ClusterKeySlot(ctx, k).Result()
								if err == nil {
									slots[s] = true
								}
							}
						}
					}
					if cursor = next; cursor == 0 {
						break
					}
				}
			}
			require.NotEmpty(t, keys)
			if b.Cluster != nil {
				require.Len(t, slots, 1, "keys in several slots")
			}
			for _, k := range keys {
				require.True(t, strings.HasSuffix(k, "}:fence") || strings.HasSuffix(k, "}:latch:done") ||
					strings.HasSuffix(k, "}:sem"), // the Semaphore's remembered releases
					"left over: %q", k[max(0, len(k)-30):])
			}
		}
	})
}

// TestOddNamesRenewed: the watchdog renews holds and queue places under
// odd names (batched by cluster slot, which a '}' inside the name or a
// '{' before it decides), so none is lost while its holder lives.
func TestOddNamesRenewed(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 30*time.Second)
		base := redistest.UniqueName(t)
		c := newClient(t, b, redlatch.WithKeyPrefix("p:"), redlatch.WithWatchdogTimeout(300*time.Millisecond))
		c2 := newClient(t, b, redlatch.WithKeyPrefix("p:"), redlatch.WithWatchdogTimeout(300*time.Millisecond))
		var lost []<-chan struct{}
		got := make(chan error, 100)
		var waiters []*redlatch.FairMutex
		for i, name := range oddNames(base) {
			owner := oddOwners[i%len(oddOwners)]
			m := c.ReentrantMutex(name, redlatch.WithOwner(owner))
			require.NoError(t, m.Lock(ctx))
			lost = append(lost, m.Lost())
			f := c.FairMutex(name, redlatch.WithOwner(owner))
			require.NoError(t, f.Lock(ctx))
			lost = append(lost, f.Lost())
			fw := c2.FairMutex(name, redlatch.WithOwner(owner+"w"))
			go func() { got <- fw.Lock(ctx) }() // its queue place is renewed
			waiters = append(waiters, fw)
			rw := c.RWMutex(name, redlatch.WithOwner(owner))
			require.NoError(t, rw.RLock(ctx))
			s := c.Semaphore(name, 1, redlatch.WithOwner(owner))
			require.NoError(t, s.Acquire(ctx, 1))
			t.Cleanup(func() {
				_ = m.Unlock(context.Background())
				_ = f.Unlock(context.Background())
				_ = rw.RUnlock(context.Background())
				_ = s.Release(context.Background(), 1)
			})
		}
		time.Sleep(1500 * time.Millisecond)
		for i, l := range lost {
			select {
			case <-l:
				t.Fatalf("hold %d lost", i)
			default:
			}
		}
		require.Empty(t, got, "a waiter got a held FairMutex")
		for i, name := range oddNames(base) {
			owner := oddOwners[i%len(oddOwners)]
			// The read hold and the permit are still there.
			ok, err := c2.RWMutex(name).TryLock(ctx)
			require.NoError(t, err)
			require.False(t, ok, "read hold of %d lost", i)
			ok, err = c2.Semaphore(name, 1).TryAcquire(ctx, 1)
			require.NoError(t, err)
			require.False(t, ok, "permit of %d lost", i)
			require.NoError(t, c.FairMutex(name, redlatch.WithOwner(owner)).Unlock(ctx))
		}
		for range waiters {
			requireNoErrWithin(t, got, 3*time.Second, "FairMutex waiter not granted")
		}
		for _, fw := range waiters {
			require.NoError(t, fw.Unlock(ctx))
		}
	})
}
