package redlatch_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// resetAtPing is a go-redis hook whose connections, once armed, lose the
// first (S)UNSUBSCRIBE naming match (written, never answered: it died with
// the connection) and then fail the connection's next PING write, closing
// the connection, as when the server resets it and the subscriber's health
// ping is the first to find out.
type resetAtPing struct {
	passHook
	match           string
	armed, reset    atomic.Bool
	lostUnsubscribe atomic.Bool
}

func (h *resetAtPing) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		cn, err := next(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &resetAtPingConn{Conn: cn, h: h}, nil
	}
}

type resetAtPingConn struct {
	net.Conn
	h    *resetAtPing
	lost bool // this connection lost the UNSUBSCRIBE
}

func (c *resetAtPingConn) Write(p []byte) (int, error) {
	lp := bytes.ToLower(p)
	if c.h.armed.Load() && bytes.Contains(lp, []byte("unsubscribe")) && bytes.Contains(p, []byte(c.h.match)) &&
		c.h.lostUnsubscribe.CompareAndSwap(false, true) {
		c.lost = true
		return len(p), nil
	}
	if c.lost && bytes.Contains(lp, []byte("\r\nping\r\n")) && c.h.reset.CompareAndSwap(false, true) {
		_ = c.Conn.Close()
		return 0, errors.New("injected: connection reset")
	}
	return c.Conn.Write(p)
}

// TestWakeAfterResetFoundByHealthPing: the subscriber connection dies with
// an UNSUBSCRIBE in flight (the last waiter of a lock gave up), and the
// subscriber's health ping is the write that finds the connection reset:
// go-redis reconnects inside that PING. The subscriber must then forget the
// confirmations the old connection owed, as it does when its read fails.
// Before, the lost UNSUBSCRIBE's count stayed: the next waiter's SUBSCRIBE
// confirmation was taken for the UNSUBSCRIBE's, the channel never became
// ready, and every waiter of that lock slept through the releases until
// its holder's lease bound (here 60s) while the channel was subscribed.
func TestWakeAfterResetFoundByHealthPing(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, name, holder := heldLongLease(t, b)

		hook := &resetAtPing{match: "{" + name + "}:wake"}
		wc := connHookedClient(t, b, hook, redlatch.WithWatchdogTimeout(3*time.Second)) // health ping after 1s of silence

		// A waiter subscribes the lock's channel and gives up: its
		// UNSUBSCRIBE is lost with the connection.
		hook.armed.Store(true)
		gctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		requireWaitErr(t, wc.Mutex(name).Lock(gctx), gctx)
		cancel()
		require.Eventually(t, hook.lostUnsubscribe.Load, 5*time.Second, 5*time.Millisecond, "no UNSUBSCRIBE lost")
		require.Eventually(t, hook.reset.Load, 5*time.Second, 5*time.Millisecond, "no health ping found the reset")

		// The next waiter of the lock subscribes on the new connection.
		waiter := wc.Mutex(name)
		got := make(chan error, 1)
		go func() { got <- waiter.Lock(ctx) }()
		time.Sleep(300 * time.Millisecond)
		require.NoError(t, holder.Unlock(ctx))
		requireNoErrWithin(t, got, 3*time.Second, "waiter slept through the release: its channel was never ready")
		require.NoError(t, waiter.Unlock(ctx))
	})
}

// flapHook is a go-redis hook for a subscriber connection that flaps: once
// down is set its dials fail, until failDials dials have failed (the
// subscriber's reconnection backoff has grown to its 1s maximum by then);
// with failSub armed, the first (S)SUBSCRIBE write naming match closes the
// connection and fails, as when the server resets it.
type flapHook struct {
	passHook
	match     string
	failDials int32

	down, failSub, failedSub, unsubscribed atomic.Bool
	dialsFailed                            atomic.Int32
	upAgain                                chan struct{}

	mu   sync.Mutex
	subs []net.Conn // connections that carried a (S)SUBSCRIBE
}

func (h *flapHook) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if h.down.Load() {
			if h.dialsFailed.Add(1) == h.failDials {
				h.down.Store(false)
				close(h.upAgain)
			}
			return nil, errors.New("injected: connection refused")
		}
		cn, err := next(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &flapConn{Conn: cn, h: h}, nil
	}
}

// kill closes every subscriber connection and makes dials fail.
func (h *flapHook) kill() {
	h.down.Store(true)
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.subs {
		_ = c.Close()
	}
}

type flapConn struct {
	net.Conn
	h *flapHook
}

func (c *flapConn) Write(p []byte) (int, error) {
	lp := bytes.ToLower(p)
	if bytes.Contains(p, []byte(c.h.match)) {
		sub := bytes.Contains(lp, []byte("\r\nsubscribe\r\n")) || bytes.Contains(lp, []byte("\r\nssubscribe\r\n"))
		if sub && c.h.failSub.CompareAndSwap(true, false) {
			c.h.failedSub.Store(true)
			_ = c.Conn.Close()
			return 0, errors.New("injected: connection reset")
		}
		if sub {
			c.h.mu.Lock()
			c.h.subs = append(c.h.subs, c.Conn)
			c.h.mu.Unlock()
		} else if bytes.Contains(lp, []byte("unsubscribe")) {
			defer c.h.unsubscribed.Store(true)
		}
	}
	return c.Conn.Write(p)
}

// TestWakeAfterResetFoundByWriter: the subscriber connection flaps while
// its reading goroutine sleeps between reconnection attempts (its backoff
// grew to 1s while the server was unreachable). Meanwhile the subscriber's
// writer dials a new connection for the UNSUBSCRIBE of a waiter that gave
// up, and that connection is reset at the next waiter's SUBSCRIBE: go-redis
// reconnects inside that call, and the reader, back from its sleep, reads
// the newest connection and never sees the other one fail. The confirmation
// the UNSUBSCRIBE was owed is gone with it and must be forgotten: before,
// its count stayed, the next waiter's SUBSCRIBE confirmation was taken for
// it, the channel never became ready, and the waiter slept through the
// release until its holder's lease bound (here 60s).
func TestWakeAfterResetFoundByWriter(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, name, holder := heldLongLease(t, b)

		hook := &flapHook{match: "{" + name + "}:wake", failDials: 8, upAgain: make(chan struct{})}
		wc := connHookedClient(t, b, hook)

		gctx, giveUp := context.WithCancel(ctx)
		defer giveUp()
		gave := make(chan error, 1)
		go func() { gave <- wc.Mutex(name).Lock(gctx) }()
		require.Eventually(t, func() bool {
			hook.mu.Lock()
			defer hook.mu.Unlock()
			return len(hook.subs) > 0
		}, 5*time.Second, 5*time.Millisecond, "the first waiter did not subscribe")
		time.Sleep(100 * time.Millisecond)

		hook.kill()
		select {
		case <-hook.upAgain: // the reader sleeps 1s before it dials again
		case <-time.After(5 * time.Second):
			t.Fatal("the subscriber did not try to reconnect")
		}
		giveUp()
		requireWaitErr(t, <-gave, gctx)
		require.Eventually(t, hook.unsubscribed.Load, time.Second, time.Millisecond, "no UNSUBSCRIBE written")

		hook.failSub.Store(true)
		waiter := wc.Mutex(name)
		got := make(chan error, 1)
		go func() { got <- waiter.Lock(ctx) }()
		require.Eventually(t, hook.failedSub.Load, time.Second, time.Millisecond, "no SUBSCRIBE failed")
		time.Sleep(1500 * time.Millisecond) // the reader is back, the SUBSCRIBE re-sent
		require.NoError(t, holder.Unlock(ctx))
		requireNoErrWithin(t, got, 3*time.Second, "waiter slept through the release: its channel was never ready")
		require.NoError(t, waiter.Unlock(ctx))
	})
}
