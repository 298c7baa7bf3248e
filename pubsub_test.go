package redlatch_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// subscriberConns returns, per node, the number of connections in
// subscriber mode (CLIENT LIST flag P).
func subscriberConns(t *testing.T, b redistest.Backend) []int {
	t.Helper()
	var out []int
	for _, n := range b.NodeClients(t) {
		list, err := n.ClientList(context.Background()).Result()
		require.NoError(t, err)
		count := 0
		for _, line := range strings.Split(list, "\n") {
			for _, f := range strings.Fields(line) {
				if strings.HasPrefix(f, "flags=") && strings.Contains(f, "P") {
					count++
				}
			}
		}
		out = append(out, count)
	}
	return out
}

// channels returns the subscribed channels (plain and sharded) matching
// pattern on every node.
//
// It is called from require.Eventually's goroutine, so it does not fail the
// test itself: an error shows as an entry "error: …", which no caller's
// condition accepts.
func channels(t *testing.T, b redistest.Backend, pattern string) []string {
	t.Helper()
	ctx := context.Background()
	var out []string
	for _, n := range b.NodeClients(t) {
		plain, err := n.PubSubChannels(ctx, pattern).Result()
		if err != nil {
			return append(out, "error: "+err.Error())
		}
		sharded, err := n.PubSubShardChannels(ctx, pattern).Result()
		if err != nil {
			return append(out, "error: "+err.Error())
		}
		out = append(append(out, plain...), sharded...)
	}
	return out
}

// TestOneSubscriberConnection: 200 waiters on 50 locks share one subscriber
// connection (one per master on a cluster), and no channel stays subscribed
// once they all left.
func TestOneSubscriberConnection(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if !b.Real() {
			t.Skip("miniredis has no CLIENT LIST flags or PUBSUB CHANNELS")
		}
		ctx := ctxT(t, 30*time.Second)
		holders, waiters := newClient(t, b), newClient(t, b)
		base := redistest.UniqueName(t)
		before := subscriberConns(t, b)
		var held []*redlatch.Mutex
		for i := 0; i < 50; i++ {
			m := holders.Mutex(base + "-" + strconv.Itoa(i))
			require.NoError(t, m.Lock(ctx))
			held = append(held, m)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 200)
		for i := 0; i < 200; i++ {
			wg.Add(1)
			go func(name string) {
				defer wg.Done()
				m := waiters.Mutex(name)
				if err := m.Lock(ctx); err != nil {
					errs <- err
					return
				}
				errs <- m.Unlock(ctx)
			}(base + "-" + strconv.Itoa(i%50))
		}
		require.Eventually(t, func() bool {
			return len(channels(t, b, "{"+base+"*")) == 50
		}, 5*time.Second, 20*time.Millisecond, "every waited-on lock has its channel")
		after := subscriberConns(t, b)
		for i := range after {
			require.LessOrEqual(t, after[i]-before[i], 1, "subscriber connections on node %d", i)
		}
		for _, m := range held {
			require.NoError(t, m.Unlock(ctx))
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err)
		}
		require.Eventually(t, func() bool {
			return len(channels(t, b, "{"+base+"*")) == 0
		}, 3*time.Second, 20*time.Millisecond, "channels left subscribed")
	})
}

// TestWakeAfterSubscriberKilled: a waiter whose subscriber connection was
// killed while it waited still wakes promptly on the unlock.
func TestWakeAfterSubscriberKilled(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if !b.Real() {
			t.Skip("miniredis has no CLIENT KILL TYPE")
		}
		ctx := ctxT(t, 30*time.Second)
		name := redistest.UniqueName(t)
		holder := newClient(t, b).Mutex(name, redlatch.WithLease(20*time.Second))
		require.NoError(t, holder.Lock(ctx))
		got := make(chan time.Time, 1)
		waiter := newClient(t, b).Mutex(name)
		go func() {
			if err := waiter.Lock(ctx); err == nil {
				got <- time.Now()
			}
		}()
		require.Eventually(t, func() bool { return len(channels(t, b, "{"+name+"}*")) == 1 },
			5*time.Second, 10*time.Millisecond)
		for _, n := range b.NodeClients(t) {
			require.NoError(t, n.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err())
		}
		time.Sleep(300 * time.Millisecond)
		released := time.Now()
		require.NoError(t, holder.Unlock(ctx))
		select {
		case at := <-got:
			require.Less(t, at.Sub(released), 1500*time.Millisecond)
		case <-time.After(5 * time.Second):
			t.Fatal("waiter did not wake after its subscriber connection was killed")
		}
		require.NoError(t, waiter.Unlock(ctx))
	})
}

// TestWaiterTakesExpiredLease: a holder that never unlocks (it crashed)
// publishes nothing; the waiter still takes the lock when the lease ends.
func TestWaiterTakesExpiredLease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		lease := 500 * time.Millisecond
		crashed := newClient(t, b).Mutex(name, redlatch.WithLease(lease))
		require.NoError(t, crashed.Lock(ctx))
		start := time.Now()
		waiter := newClient(t, b).Mutex(name)
		require.NoError(t, waiter.Lock(ctx))
		require.Less(t, time.Since(start), lease+300*time.Millisecond)
		require.NoError(t, waiter.Unlock(ctx))
	})
}

// TestCancelledWaiterUnsubscribes: a waiter whose ctx ends leaves no
// subscription behind, and does not swallow a wake-up meant for another.
func TestCancelledWaiterUnsubscribes(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		holder := newClient(t, b).Mutex(name)
		require.NoError(t, holder.Lock(ctx))
		c := newClient(t, b)
		wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		requireWaitErr(t, c.Mutex(name).Lock(wctx), wctx)
		if b.Real() {
			require.Eventually(t, func() bool { return len(channels(t, b, "{"+name+"}*")) == 0 },
				3*time.Second, 10*time.Millisecond, "a cancelled waiter left its subscription")
		}
		// Two waiters; the first gives up right after the release: the
		// second still gets the lock promptly.
		first, second := c.Mutex(name), c.Mutex(name)
		fctx, fcancel := context.WithCancel(ctx)
		firstDone := make(chan error, 1)
		go func() { firstDone <- first.Lock(fctx) }()
		time.Sleep(50 * time.Millisecond)
		secondDone := make(chan time.Time, 1)
		go func() {
			if second.Lock(ctx) == nil {
				secondDone <- time.Now()
			}
		}()
		time.Sleep(100 * time.Millisecond)
		released := time.Now()
		require.NoError(t, holder.Unlock(ctx))
		fcancel()
		if err := <-firstDone; err == nil {
			require.NoError(t, first.Unlock(ctx))
		}
		select {
		case at := <-secondDone:
			require.Less(t, at.Sub(released), time.Second)
		case <-time.After(5 * time.Second):
			t.Fatal("second waiter stranded")
		}
		require.NoError(t, second.Unlock(ctx))
	})
}

// TestQueuedWaiterNotStranded: a crashed holder's lease ends; the waiter
// that would have retried at that moment gave up; the waiter queued behind
// it still takes the lock about when the lease ends, not a watchdog period
// later.
func TestQueuedWaiterNotStranded(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		lease := time.Second
		crashed := newClient(t, b).Mutex(name, redlatch.WithLease(lease))
		require.NoError(t, crashed.Lock(ctx))
		start := time.Now()
		c := newClient(t, b, redlatch.WithWatchdogTimeout(15*time.Second))
		w1ctx, cancel1 := context.WithCancel(ctx)
		w1done := make(chan error, 1)
		go func() { w1done <- c.Mutex(name).Lock(w1ctx) }()
		time.Sleep(100 * time.Millisecond)
		w2done := make(chan time.Time, 1)
		w2 := c.Mutex(name)
		go func() {
			if w2.Lock(ctx) == nil {
				w2done <- time.Now()
			}
		}()
		time.Sleep(100 * time.Millisecond)
		cancel1()
		require.Error(t, <-w1done)
		select {
		case at := <-w2done:
			require.Less(t, at.Sub(start), lease+500*time.Millisecond)
		case <-time.After(10 * time.Second):
			t.Fatal("queued waiter stranded")
		}
		require.NoError(t, w2.Unlock(ctx))
	})
}

// TestWakeAfterSubscriberHalfOpen: the waiter's subscriber connection goes
// silent in both directions without being closed (its peer host died, or a
// partition swallowed the close), and the unlock's message is lost in it.
// The subscriber's unanswered health ping drops the connection, subscribes
// again, and the waiter retries: it takes the lock within about two health
// intervals (a third of the watchdog timeout each), not after the holder's
// 60s lease.
func TestWakeAfterSubscriberHalfOpen(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Server == nil {
			t.Skip("single real server only: the proxy fronts one address")
		}
		// With write deadlines off too (WriteTimeout -2; ReadTimeout -2
		// alone does the same): the subscriber drops an unresponsive
		// connection by a ping written under a past deadline, which such
		// a client never set, so nothing was dropped and the waiter stayed
		// deaf until the holder's lease.
		for _, wt := range []time.Duration{0, -2} {
			t.Run(fmt.Sprintf("WriteTimeout=%d", wt), func(t *testing.T) {
				ctx, name, holder := heldLongLease(t, b)

				proxy := redistest.NewProxy(t, b.Server.Addr)
				opts := b.Server.Options()
				opts.Addr = proxy.Addr
				opts.WriteTimeout = wt
				rdb := redis.NewClient(opts)
				t.Cleanup(func() { _ = rdb.Close() })
				wc := redlatch.New(rdb, redlatch.WithWatchdogTimeout(3*time.Second)) // health checks every 1s
				t.Cleanup(func() { _ = wc.Close() })
				requireWokenThroughHalfOpen(t, ctx, b, name, holder, wc.Mutex(name), proxy.Freeze)
			})
		}
	})
}

// requireWokenThroughHalfOpen starts waiter's Lock of name (its Client's watchdog
// timeout 3s: health checks every 1s) behind holder's, waits for its
// subscription, makes the waiter's links half-open with freeze (it returns
// how many connections it froze), releases holder and requires the waiter
// to take the lock within about two health intervals, not after the
// holder's lease.
func requireWokenThroughHalfOpen(t *testing.T, ctx context.Context, b redistest.Backend, name string, holder, waiter *redlatch.Mutex, freeze func() int) {
	t.Helper()
	got := make(chan time.Time, 1)
	go func() {
		if err := waiter.Lock(ctx); err == nil {
			got <- time.Now()
		}
	}()
	require.Eventually(t, func() bool { return len(channels(t, b, "{"+name+"}*")) == 1 },
		5*time.Second, 10*time.Millisecond)
	require.Positive(t, freeze())
	released := time.Now()
	require.NoError(t, holder.Unlock(ctx))
	select {
	case at := <-got:
		require.Less(t, at.Sub(released), 6*time.Second)
	case <-time.After(20 * time.Second):
		t.Fatal("waiter stranded on a half-open subscriber connection")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// TestWakeAfterSlotMoved: a waiter's sharded subscription on a Redis ≥ 7
// cluster follows its channel when the slot moves to another master (the
// old master drops the subscription with an SUNSUBSCRIBE of its own), so the
// release published on the new master still wakes it: within a second,
// not after the holder's 60s lease.
func TestWakeAfterSlotMoved(t *testing.T) {
	cl := redistest.NewCluster(t, 3) // private: the test moves a slot
	ctx := ctxT(t, 60*time.Second)
	newC := func() *redlatch.Client {
		rdb := cl.Client(t)
		c := newClientOn(t, rdb)
		return c
	}
	name := redistest.UniqueName(t)
	holder := newC().Mutex(name, redlatch.WithLease(60*time.Second))
	require.NoError(t, holder.Lock(ctx))
	waiter := newC().Mutex(name)
	got := make(chan time.Time, 1)
	go func() {
		if err := waiter.Lock(ctx); err == nil {
			got <- time.Now()
		}
	}()
	owner := cl.ServerFor("{" + name + "}")
	admin := redis.NewClient(owner.Options())
	t.Cleanup(func() { _ = admin.Close() })
	require.Eventually(t, func() bool {
		n, err := admin.Do(ctx, "PUBSUB", "SHARDNUMSUB", "{"+name+"}:wake").Slice()
		return err == nil && len(n) == 2 && n[1] == int64(1)
	}, 5*time.Second, 10*time.Millisecond, "the waiter did not subscribe")

	to := 0
	for i, s := range cl.Servers {
		if s != owner {
			to = i
		}
	}
	cl.MoveSlot(t, redistest.KeySlot("{"+name+"}"), to)
	time.Sleep(time.Second) // the subscription follows the slot
	released := time.Now()
	require.NoError(t, holder.Unlock(ctx)) // its script and SPUBLISH run on the new master
	select {
	case at := <-got:
		require.Less(t, at.Sub(released), time.Second)
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter was not woken after its channel's slot moved")
	}
	require.NoError(t, waiter.Unlock(ctx))
}

// failSubscribe is a go-redis hook whose connections fail, once armed, the
// first write of a (S)SUBSCRIBE naming match: the connection is closed and
// the write returns an error, as when the server resets the connection.
type failSubscribe struct {
	passHook
	match         string
	armed, failed atomic.Bool
}

func (h *failSubscribe) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		cn, err := next(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &failSubscribeConn{Conn: cn, h: h}, nil
	}
}

// heldLongLease begins a test of a waiter that pub/sub must wake: a
// holder on a Client of its own holds a fresh lock on a 60s lease, far
// beyond the test's bounds, so that a waiter not woken shows. It returns
// the test's context, the lock's name and the holder.
func heldLongLease(t *testing.T, b redistest.Backend) (context.Context, string, *redlatch.Mutex) {
	t.Helper()
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	holder := newClient(t, b).Mutex(name, redlatch.WithLease(60*time.Second))
	require.NoError(t, holder.Lock(ctx))
	return ctx, name, holder
}

// connHookedClient returns a Client on a new go-redis client of b whose
// connections go through hook (its DialHook wraps them): on a cluster the
// hook is added to each node's client as it is made, since those dial.
func connHookedClient(t *testing.T, b redistest.Backend, hook redis.Hook, opts ...redlatch.Option) *redlatch.Client {
	t.Helper()
	rdb := b.Client(t)
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		cc.OnNewNode(func(n *redis.Client) { n.AddHook(hook) })
	} else {
		rdb.AddHook(hook)
	}
	c := newClientOn(t, rdb, opts...)
	return c
}

type failSubscribeConn struct {
	net.Conn
	h *failSubscribe
}

func (c *failSubscribeConn) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("subscribe")) && bytes.Contains(p, []byte(c.h.match)) && c.h.armed.CompareAndSwap(true, false) {
		c.h.failed.Store(true)
		_ = c.Conn.Close()
		return 0, errors.New("injected: connection reset")
	}
	return c.Conn.Write(p)
}

// TestWakeAfterFailedSubscribe: a waiter's SUBSCRIBE whose write fails is
// sent again. go-redis reconnects inside the failed call, before it adds the
// channel to the set it subscribes on a new connection, so the new
// connection lacks the channel: without the resend the waiter would sleep
// until the holder's 60s lease.
func TestWakeAfterFailedSubscribe(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, name, holder := heldLongLease(t, b)

		hook := &failSubscribe{match: "{" + name + "}:wake"}
		hook.armed.Store(true)
		wc := connHookedClient(t, b, hook)
		waiter := wc.Mutex(name)
		got := make(chan error, 1)
		go func() { got <- waiter.Lock(ctx) }()
		require.Eventually(t, hook.failed.Load, 5*time.Second, 10*time.Millisecond, "no subscribe failed")
		require.Eventually(t, func() bool { return len(channels(t, b, hook.match)) == 1 },
			5*time.Second, 10*time.Millisecond, "the channel was not subscribed again")
		require.NoError(t, holder.Unlock(ctx))
		requireNoErrWithin(t, got, 5*time.Second, "waiter stranded after a failed subscribe")
		require.NoError(t, waiter.Unlock(ctx))
	})
}

// TestOneSubscriberConnPerNode: API.md, one Client has at most one
// subscriber connection per Redis node, however many waiters of however
// many kinds and names wait.
func TestOneSubscriberConnPerNode(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if !b.Real() {
			t.Skip("CLIENT LIST")
		}
		holder, c := newClient(t, b), newClient(t, b)
		ctx := ctxT(t, 20*time.Second)
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		subscribers := func() []int { // per node: connections in pub/sub mode, any Client's
			var out []int
			for _, node := range b.NodeClients(t) {
				list, err := node.ClientList(ctx).Result()
				require.NoError(t, err)
				out = append(out, strings.Count(list, "flags=P"))
			}
			return out
		}
		before := subscribers()
		base := redistest.UniqueName(t)
		errs := make(chan error, 64)
		waiters := 0
		for i := range 8 {
			name := base + "-" + strconv.Itoa(i)
			require.NoError(t, holder.Mutex(name).Lock(ctx))
			require.NoError(t, holder.FairMutex(name).Lock(ctx))
			require.NoError(t, holder.RWMutex(name).Lock(ctx))
			require.NoError(t, holder.Semaphore(name, 1).Acquire(ctx, 1))
			_, err := holder.CountDownLatch(name).TrySetCount(ctx, 1)
			require.NoError(t, err)
			for _, wait := range []func(context.Context) error{
				c.Mutex(name).Lock, c.FairMutex(name).Lock, c.RWMutex(name).Lock, c.RWMutex(name).RLock,
				func(ctx context.Context) error { return c.Semaphore(name, 1).Acquire(ctx, 1) },
				c.CountDownLatch(name).Wait,
			} {
				waiters++
				go func() { errs <- wait(wctx) }()
			}
		}
		time.Sleep(500 * time.Millisecond)
		added := 0
		for i, n := range subscribers() {
			require.LessOrEqual(t, n-before[i], 1, "subscriber connections of one Client on node %d", i)
			added += n - before[i]
		}
		require.Positive(t, added, "no waiter subscribed")
		cancel()
		for range waiters {
			require.ErrorIs(t, <-errs, redlatch.ErrNotObtained)
		}
	})
}

// subscribers counts the connections of srv subscribed to a channel.
func subscribers(t *testing.T, srv *redistest.Server) int {
	t.Helper()
	rdb := redis.NewClient(srv.Options())
	defer rdb.Close()
	list, err := rdb.ClientList(context.Background()).Result()
	require.NoError(t, err)
	n := 0
	re := regexp.MustCompile(`\b(sub|ssub|psub)=([1-9][0-9]*)`)
	for _, l := range strings.Split(list, "\n") {
		if re.MatchString(l) {
			n++
		}
	}
	return n
}

// TestCloseClosesHealthySubscribersAtOnce: a subscriber connection whose
// reconnection hangs on a frozen master must not keep the Client's
// subscriber connections to the healthy masters open after Close.
func TestCloseClosesHealthySubscribersAtOnce(t *testing.T) {
	cl := redistest.NewCluster(t, 3)
	ctx := ctxT(t, 20*time.Second)
	frozen := cl.Servers[0]
	holder := newClientOn(t, cl.Client(t))
	var names []string
	for j, s := range cl.Servers {
		name := closeNameOn(t, cl, s, fmt.Sprint("w", j))
		require.NoError(t, holder.Mutex(name, redlatch.WithLease(20*time.Second)).Lock(ctx))
		names = append(names, name)
	}
	var clients []*redlatch.Client
	got := make(chan error, 16)
	for i := 0; i < 4; i++ { // several Clients: the order of their masters varies
		opts := cl.Options()
		opts.ReadTimeout = 4 * time.Second // the reconnection's handshake waits that long
		cc := redis.NewClusterClient(opts)
		t.Cleanup(func() { _ = cc.Close() })
		c := redlatch.New(cc, redlatch.WithWatchdogTimeout(3*time.Second)) // health checks every 1s
		t.Cleanup(func() { _ = c.Close() })
		clients = append(clients, c)
		for _, name := range names {
			go func() { got <- c.Mutex(name).Lock(ctx) }()
		}
	}
	healthy := cl.Servers[1:]
	time.Sleep(500 * time.Millisecond) // the waiters wait, subscribed
	for _, s := range healthy {
		require.NotZero(t, subscribers(t, s))
	}
	frozen.Stop(t)
	t.Cleanup(func() { frozen.Cont(t) })
	// Ping at 1s, dropped at 2s, then the reconnection's handshake waits.
	time.Sleep(2500 * time.Millisecond)
	start := time.Now()
	for _, c := range clients {
		require.NoError(t, c.Close())
	}
	t.Logf("Close of %d Clients took %v", len(clients), time.Since(start).Round(time.Millisecond))
	for range 3 * len(clients) {
		require.ErrorIs(t, <-got, redlatch.ErrClosed)
	}
	time.Sleep(300 * time.Millisecond)
	for i, s := range healthy {
		require.Zero(t, subscribers(t, s), "healthy master %d: subscriber connections still open %v after Close", i+1, time.Since(start).Round(time.Millisecond))
	}
	frozen.Cont(t)
}

// closeNameOn returns a fresh name whose hash tag is on server s of cl.
func closeNameOn(t *testing.T, cl *redistest.Cluster, s *redistest.Server, kind string) string {
	for i := 0; ; i++ {
		n := fmt.Sprintf("%s-%s-%d", redistest.UniqueName(t), kind, i)
		if cl.ServerFor("{"+n+"}") == s {
			return n
		}
	}
}
