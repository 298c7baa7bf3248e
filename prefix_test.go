package redlatch_test

import (
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
