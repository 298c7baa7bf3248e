package redlatch_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestMain stops the shared Redis servers and fails the run when a
// goroutine outlives the tests.
//
// The tests that call t.Parallel (the longest, mostly waiting on servers of
// their own: failovers, slot migrations) run after all the others, beside
// each other (go test's -parallel, GOMAXPROCS by default). Such a test
// must touch no shared server, count no goroutines of the process and set
// no package-level state; its time bounds must allow for its neighbours'
// load. Its parallel subtests start only once it has returned and
// -parallel lets them, maybe a minute later: each makes its own ctx.
func TestMain(m *testing.M) { redistest.Main(m) }

// newClient returns a redlatch Client on a fresh Redis client of b, closed
// at the end of the test.
func newClient(t testing.TB, b redistest.Backend, opts ...redlatch.Option) *redlatch.Client {
	t.Helper()
	return newClientOn(t, b.Client(t), opts...)
}

// newClientOn returns a Client on rdb, closed in t.Cleanup.
func newClientOn(t testing.TB, rdb redis.UniversalClient, opts ...redlatch.Option) *redlatch.Client {
	t.Helper()
	c := redlatch.New(rdb, opts...)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// serverBackend is the backend of a private server a test started.
func serverBackend(srv *redistest.Server) redistest.Backend {
	return redistest.Backend{Name: redistest.BackendRedis, Server: srv}
}

// ctxT returns a context that ends with the test or after d.
func ctxT(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// lockKey is the documented layout of an exclusive lock's hash.
func lockKey(name string) string { return "{" + name + "}:lock" }

// requireNoErrWithin waits up to d for got to deliver, and requires that
// what it delivers is nil; msg says what did not happen in time.
func requireNoErrWithin(t *testing.T, got <-chan error, d time.Duration, msg string) {
	t.Helper()
	select {
	case err := <-got:
		require.NoError(t, err)
	case <-time.After(d):
		t.Fatal(msg)
	}
}

func requireWaitErr(t *testing.T, err error, ctx context.Context) {
	t.Helper()
	require.Error(t, err)
	require.ErrorIs(t, err, redlatch.ErrNotObtained)
	require.ErrorIs(t, err, ctx.Err())
}

// lockFns are one handle's acquisition, attempt and release.
type lockFns struct {
	lock   func(context.Context) error
	try    func(context.Context) (bool, error)
	unlock func(context.Context) error
}

// requireFailedReleaseResent: the holder's release fails before its
// outcome is known (match fails it unsent: every retry of go-redis
// failed), then the holder goes on taking and releasing the lock (a try
// every quarter of the watchdog timeout); a waiter of another Client must
// still get in within 5 timeouts. The release is sent again: without it,
// the holder's next acquisition re-entered the count the failed release
// left, and renewed it, and the waiter never got in.
func requireFailedReleaseResent(t *testing.T, b redistest.Backend, name string, match func(redis.Cmder) bool,
	holder, waiter func(*redlatch.Client) lockFns) {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	timeout := 600 * time.Millisecond
	rdb := b.Client(t)
	hook := &refuseHook{match: match, nth: 1} // the first one once armed, unsent
	rdb.AddHook(hook)
	h := holder(newClientOn(t, rdb, redlatch.WithWatchdogTimeout(timeout)))
	require.NoError(t, h.lock(ctx))
	hook.armed.Store(true)
	require.Error(t, h.unlock(ctx))

	w := waiter(newClient(t, b, redlatch.WithWatchdogTimeout(timeout)))
	got := make(chan error, 1)
	go func() { got <- w.lock(ctx) }()
	deadline := time.After(5 * timeout)
	for {
		select {
		case err := <-got:
			require.NoError(t, err)
			require.NoError(t, w.unlock(ctx))
			return
		case <-deadline:
			t.Fatal("the waiter never got in: the failed release left its count, renewed by the holder's later acquisitions")
		case <-time.After(timeout / 4):
		}
		ok, err := h.try(ctx)
		require.NoError(t, err)
		if ok {
			require.NoError(t, h.unlock(ctx))
		}
	}
}
