package redistest

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { Main(m) }

func TestBackendsAnswer(t *testing.T) {
	ForEach(t, func(t *testing.T, b Backend) {
		ctx := context.Background()
		rdb := b.Client(t)
		require.NoError(t, rdb.Ping(ctx).Err())
		for i := 0; i < 20; i++ { // 20 hash tags: on the cluster, every master
			key := "{" + UniqueName(t) + strconv.Itoa(i) + "}x"
			require.NoError(t, rdb.Set(ctx, key, "v", time.Minute).Err())
			require.Equal(t, "v", rdb.Get(ctx, key).Val())
		}
	})
}

func TestServerFaults(t *testing.T) {
	s := NewServer(t)
	rdb := s.Client(t)
	ctx := context.Background()
	require.NoError(t, rdb.Set(ctx, "k", "v", 0).Err())

	s.Stop(t)
	sctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	require.Error(t, rdb.Ping(sctx).Err(), "a frozen server answered")
	s.Cont(t)
	require.Eventually(t, func() bool { return rdb.Ping(ctx).Err() == nil }, 3*time.Second, 20*time.Millisecond)

	s.Restart(t)
	require.Eventually(t, func() bool { return rdb.Ping(ctx).Err() == nil }, 3*time.Second, 20*time.Millisecond)
	require.Zero(t, rdb.Exists(ctx, "k").Val(), "a restart without persistence kept data")

	s.Kill(t)
	require.Error(t, rdb.Ping(ctx).Err())
	s.Start(t)
	require.Eventually(t, func() bool { return rdb.Ping(ctx).Err() == nil }, 3*time.Second, 20*time.Millisecond)
}

func TestUniqueName(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		n := UniqueName(t)
		require.False(t, seen[n])
		require.NotContains(t, n, "{")
		seen[n] = true
	}
}
