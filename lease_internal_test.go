package redlatch

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// TestLocalDeadlineNotPastRedisLease: Redis counts leases in whole
// milliseconds (the scripts send lease.Milliseconds(), truncated), so a
// lease with a fraction of a millisecond (WithLease(10*time.Second/3),
// WithWatchdogTimeout(1000500*time.Microsecond)) must not put the holder's
// local deadline that fraction later than the lease Redis was given: the
// deadline is at most the send time plus the whole milliseconds sent, so at
// most the time Lock returned plus them.
func TestLocalDeadlineNotPastRedisLease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		frac := 300*time.Millisecond + 999*time.Microsecond
		c := New(b.Client(t), WithWatchdogTimeout(frac))
		t.Cleanup(func() { _ = c.Close() })
		for _, opts := range [][]LockOption{{WithLease(frac)}, nil} {
			late := 0
			for i := 0; i < 10; i++ {
				m := c.Mutex(redistest.UniqueName(t), opts...)
				require.NoError(t, m.Lock(ctx))
				returned := time.Now()
				m.mu.Lock()
				h := m.h
				m.mu.Unlock()
				sentMs := time.Duration(frac.Milliseconds()) * time.Millisecond
				if c.wd.deadlineOf(h).After(returned.Add(sentMs)) {
					late++
				}
				require.NoError(t, m.Unlock(ctx))
			}
			require.Zero(t, late, "local deadline later than the lease Redis was given (%d of 10 holds, renew=%v)", late, opts == nil)
		}
	})
}
