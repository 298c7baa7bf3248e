package redlatch_test

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// slowSubscribeConn delays every write that carries a (un)subscribe
// command: a subscriber connection whose SUBSCRIBE takes long to reach the
// server (a remote Redis, a congested link).
type slowSubscribeConn struct {
	net.Conn
	delay time.Duration
}

func (c *slowSubscribeConn) Write(p []byte) (int, error) {
	if bytes.Contains(bytes.ToLower(p), []byte("\r\nsubscribe\r\n")) {
		time.Sleep(c.delay)
	}
	return c.Conn.Write(p)
}

// TestWakeAfterLateSubscribeConfirm: a waiter's first attempt fails with a
// short bound (a permit record about to expire), so join stops waiting for
// the subscription's confirmation after that bound; the second attempt
// fails too (bound: the long-lease holder, 30s), and a Release landing
// before the SUBSCRIBE reaches Redis is missed. The first confirmation
// wakes such a waiter to try again (it slept until the holder's lease
// bound).
func TestWakeAfterLateSubscribeConfirm(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Server == nil {
			t.Skip("needs a single real redis-server")
		}
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		opts := b.Server.Options()
		opts.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &slowSubscribeConn{Conn: conn, delay: 1500 * time.Millisecond}, nil
		}
		slow := redis.NewClient(opts)
		t.Cleanup(func() { _ = slow.Close() })
		wc := newClientOn(t, slow)

		holder := newClient(t, b).Semaphore(name, 3)
		short := newClient(t, b).Semaphore(name, 3, redlatch.WithLease(300*time.Millisecond))
		require.NoError(t, holder.Acquire(ctx, 2))
		require.NoError(t, short.Acquire(ctx, 1))

		got := make(chan time.Time, 1)
		go func() {
			if err := wc.Semaphore(name, 3).Acquire(ctx, 2); err == nil {
				got <- time.Now()
			}
		}()
		time.Sleep(700 * time.Millisecond) // both attempts failed; SUBSCRIBE still on its way
		released := time.Now()
		require.NoError(t, holder.Release(ctx, 2))
		select {
		case at := <-got:
			t.Logf("acquired %v after the release", at.Sub(released))
		case <-time.After(5 * time.Second):
			t.Fatal("the waiter missed the release and sleeps until the holder's lease bound")
		}
	})
}
