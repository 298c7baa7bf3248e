package redlatch_test

import (
	"context"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// busyServer makes srv answer BUSY to nearly every command (a script that
// runs past busy-reply-threshold, here 100ms) until the returned function
// kills the script.
func busyServer(t *testing.T, ctx context.Context, srv *redistest.Server, adm *redis.Client) (end func()) {
	t.Helper()
	require.NoError(t, adm.ConfigSet(ctx, "busy-reply-threshold", "100").Err())
	busy := srv.Client(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = busy.Eval(context.Background(), "while true do end", nil).Err()
	}()
	require.Eventually(t, func() bool {
		err := adm.Ping(ctx).Err()
		return err != nil && strings.HasPrefix(err.Error(), "BUSY")
	}, 5*time.Second, 20*time.Millisecond, "the server is not busy")
	return func() {
		require.NoError(t, adm.Do(ctx, "SCRIPT", "KILL").Err())
		<-done
		require.Eventually(t, func() bool { return adm.Ping(ctx).Err() == nil }, 5*time.Second, 20*time.Millisecond)
	}
}

// dialCounter is a go-redis hook counting dials.
type dialCounter struct {
	passHook
	n atomic.Int32
}

func (h *dialCounter) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		h.n.Add(1)
		return next(ctx, network, addr)
	}
}

// TestWakeAfterSubscriberCommandRefused: Redis refuses a subscriber
// connection's (UN)SUBSCRIBE with an error reply instead of confirming it
// (here BUSY, while a script runs past busy-reply-threshold; NOPERM is
// another). The subscriber logged the error and went on, so what the server
// had subscribed and what redlatch counted parted for good, until the
// connection happened to reconnect:
//
//   - unsubscribe: the last waiter of a lock gave up during the busy spell;
//     its refused UNSUBSCRIBE left the channel subscribed at the server and
//     its confirmation counted as owed. The next waiter's SUBSCRIBE
//     confirmation was taken for it: the channel never became ready, and
//     every later waiter of that lock on the Client slept in join until its
//     holder's lease bound (here 60s) although the release's wake-up came.
//   - resubscribe: the health ping was refused too, so it counted as
//     unanswered and the subscriber dropped the connection a health
//     interval later; go-redis dialled again and re-subscribed every
//     channel in one SUBSCRIBE, refused as well. No channel was subscribed
//     any more while every one of them counted as ready: every wake-up of
//     every lock was lost, each waiter sleeping until its holder's lease.
//
// "cluster-plain" is a cluster of Redis < 7 (plain pub/sub, the subscriber a
// PubSub of the *redis.ClusterClient) whose write deadlines are off
// (WriteTimeout -2): the subscriber dropped the connection by a ping written
// under a past deadline, which such a client never sets, so the refusal left
// the connection up with its confirmations owed, as above.
//
// (Found by a reviewer.)
func TestWakeAfterSubscriberCommandRefused(t *testing.T) {
	redistest.Together(t, func(run func(string, func(*testing.T))) {
		for _, topo := range []string{"redis", "cluster", "cluster-plain"} {
			for _, tc := range []string{"unsubscribe", "resubscribe"} {
				run(topo+"/"+tc, func(t *testing.T) { subscriberCommandRefused(t, topo, tc) })
			}
		}
	})
}

func subscriberCommandRefused(t *testing.T, topo string, tc string) {
	ctx := ctxT(t, 60*time.Second)
	name := redistest.UniqueName(t)
	channel := "{" + name + "}:wake"
	var servers []*redistest.Server
	var newRdb func() redis.UniversalClient
	switch topo {
	case "redis":
		srv := redistest.NewServer(t)
		servers = []*redistest.Server{srv}
		newRdb = func() redis.UniversalClient { return srv.Client(t) }
	case "cluster":
		cl := redistest.NewCluster(t, 3) // private: one master is made busy
		servers = []*redistest.Server{cl.ServerFor("{" + name + "}")}
		newRdb = func() redis.UniversalClient { return cl.Client(t) }
	case "cluster-plain":
		cl := redistest.NewCluster(t, 3)
		servers = cl.Servers // the subscriber's is found below
		newRdb = func() redis.UniversalClient {
			opts := cl.Options()
			opts.WriteTimeout = -2
			cc := redis.NewClusterClient(opts)
			t.Cleanup(func() { _ = cc.Close() })
			cc.OnNewNode(func(n *redis.Client) { n.AddHook(redis6Info{}) })
			return cc
		}
	}
	adms := make([]*redis.Client, len(servers))
	for i, s := range servers {
		adms[i] = s.Client(t)
	}
	hc := newClientOn(t, newRdb())
	holder := hc.Mutex(name, redlatch.WithLease(60*time.Second))
	require.NoError(t, holder.Lock(ctx))
	dials := &dialCounter{}
	wrdb := newRdb()
	if cc, ok := wrdb.(*redis.ClusterClient); ok {
		cc.OnNewNode(func(n *redis.Client) { n.AddHook(dials) })
	} else {
		wrdb.AddHook(dials)
	}
	wc := redlatch.New(wrdb, redlatch.WithWatchdogTimeout(3*time.Second)) // health ping after 1s of silence
	t.Cleanup(func() { _ = wc.Close() })
	// subscriber returns the server the channel is subscribed on, or -1.
	subscriber := func() int {
		for i, adm := range adms {
			if topo == "cluster" {
				n, err := adm.Do(ctx, "PUBSUB", "SHARDNUMSUB", channel).Slice()
				if err == nil && len(n) == 2 && n[1] == int64(1) {
					return i
				}
			} else if n, err := adm.PubSubNumSub(ctx, channel).Result(); err == nil && n[channel] == 1 {
				return i
			}
		}
		return -1
	}
	subscribed := func() bool { return subscriber() >= 0 }
	busy := func() (end func()) {
		i := subscriber()
		require.GreaterOrEqual(t, i, 0, "the channel is not subscribed")
		return busyServer(t, ctx, servers[i], adms[i])
	}

	waiter := wc.Mutex(name)
	got := make(chan error, 1)
	if tc == "unsubscribe" {
		wctx, giveUp := context.WithCancel(ctx)
		gave := make(chan error, 1)
		go func() { gave <- wc.Mutex(name).Lock(wctx) }()
		require.Eventually(t, subscribed, 5*time.Second, 10*time.Millisecond, "the first waiter did not subscribe")
		end := busy()
		giveUp() // its UNSUBSCRIBE is refused
		requireWaitErr(t, <-gave, wctx)
		time.Sleep(200 * time.Millisecond)
		end()
		assert.Eventually(t, func() bool { return !subscribed() }, 3*time.Second, 10*time.Millisecond,
			"the channel stayed subscribed after its last waiter left")
		go func() { got <- lockThroughBusy(ctx, waiter) }()
	} else {
		go func() { got <- lockThroughBusy(ctx, waiter) }()
		require.Eventually(t, subscribed, 5*time.Second, 10*time.Millisecond, "the waiter did not subscribe")
		before := dials.n.Load()
		end := busy()
		// 1s of silence: a ping, refused; 1s more: the connection is
		// dropped, and its re-subscription refused.
		require.Eventually(t, func() bool { return dials.n.Load() > before }, 5*time.Second, time.Millisecond,
			"the subscriber did not reconnect")
		time.Sleep(200 * time.Millisecond)
		end()
	}
	time.Sleep(300 * time.Millisecond)
	require.NoError(t, holder.Unlock(ctx))
	requireNoErrWithin(t, got, 3*time.Second, "waiter slept through the release")
	require.NoError(t, waiter.Unlock(ctx))
}

// lockThroughBusy is m.Lock(ctx), tried again when the lock's master
// refused an attempt with BUSY: on a cluster of plain pub/sub the busy
// master may be the lock's too, and a re-subscription's confirmation (on
// another master) wakes the waiter, whose attempt is then refused.
func lockThroughBusy(ctx context.Context, m *redlatch.Mutex) error {
	for {
		err := m.Lock(ctx)
		if err == nil || !strings.HasPrefix(err.Error(), "BUSY") {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestNopermChannelSparesOtherWakeups: the Client's Redis user may not
// subscribe to one lock's wake-up channel (an ACL channel pattern that a
// lock name falls outside of: NOPERM). A waiter of that lock gets no
// wake-ups, and waits out its holder's lease. A waiter of another lock,
// whose channel the user may subscribe to, must still be woken by its
// holder's release:
//   - "steady": the subscriber dropped its connection on the NOPERM, and
//     go-redis re-subscribed its whole set, the forbidden channel with the
//     others, in one SUBSCRIBE that was refused again: no channel was
//     subscribed any more, every second a new connection.
//   - "reconnect": the subscriber connection then breaks for an ordinary
//     reason (CLIENT KILL; a restart, a half-open link or a BUSY drop do
//     the same). go-redis's whole-set re-subscription is refused for the
//     forbidden channel, and was ignored: nothing stayed subscribed.
//
// (Found by reviewers.)
func TestNopermChannelSparesOtherWakeups(t *testing.T) {
	for _, reconnect := range []bool{false, true} {
		t.Run(map[bool]string{false: "steady", true: "reconnect"}[reconnect], func(t *testing.T) {
			ctx := ctxT(t, 60*time.Second)
			srv := redistest.NewServer(t)
			adm := srv.Client(t)
			require.NoError(t, adm.Do(ctx, "ACL", "SETUSER", "w", "on", ">pw", "~*", "+@all", "resetchannels", "&{ok*").Err())
			base := redistest.UniqueName(t)
			okName, badName := "ok"+base, "bad"+base
			okChan := "{" + okName + "}:wake"

			hc := redlatch.New(srv.Client(t)) // the holders: the default user
			t.Cleanup(func() { _ = hc.Close() })
			okHolder := hc.Mutex(okName, redlatch.WithLease(60*time.Second))
			badHolder := hc.Mutex(badName, redlatch.WithLease(60*time.Second))
			require.NoError(t, okHolder.Lock(ctx))
			require.NoError(t, badHolder.Lock(ctx))

			wrdb := redis.NewClient(&redis.Options{Addr: srv.Addr, Username: "w", Password: "pw"})
			t.Cleanup(func() { _ = wrdb.Close() })
			wc := newClientOn(t, wrdb, redlatch.WithWatchdogTimeout(3*time.Second))

			okGot := make(chan error, 1)
			okWaiter := wc.Mutex(okName)
			go func() { okGot <- okWaiter.Lock(ctx) }()
			subscribed := func() bool {
				n, err := adm.PubSubNumSub(ctx, okChan).Result()
				return err == nil && n[okChan] == 1
			}
			require.Eventually(t, subscribed, 5*time.Second, 10*time.Millisecond, "the waiter did not subscribe")

			badCtx, giveUp := context.WithCancel(ctx)
			badGot := make(chan error, 1)
			go func() { badGot <- wc.Mutex(badName).Lock(badCtx) }() // its SUBSCRIBE is refused
			t.Cleanup(func() { giveUp(); <-badGot })
			if reconnect {
				time.Sleep(500 * time.Millisecond)
				require.NoError(t, adm.Do(ctx, "CLIENT", "KILL", "USER", "w").Err())
				require.Eventually(t, subscribed, 5*time.Second, 10*time.Millisecond,
					"after a reconnection the permitted channel is no longer subscribed")
			} else {
				time.Sleep(2 * time.Second)
			}

			require.NoError(t, okHolder.Unlock(ctx))
			requireNoErrWithin(t, okGot, 3*time.Second, "the waiter of the permitted lock slept through the release")
			require.NoError(t, okWaiter.Unlock(ctx))
		})
	}
}

// aclUser creates, on every master of cl, an ACL user with every key and
// channel and the given command rules, and returns options to connect as it.
func aclUser(t *testing.T, cl *redistest.Cluster, rules ...string) *redis.ClusterOptions {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	user := redistest.UniqueName(t)
	for _, s := range cl.Servers {
		args := []any{"ACL", "SETUSER", user, "reset", "on", ">pw", "~*", "&*"}
		for _, r := range rules {
			args = append(args, r)
		}
		require.NoError(t, s.Client(t).Do(ctx, args...).Err())
	}
	o := cl.Options()
	o.Username, o.Password = user, "pw"
	return o
}

// TestClusterUserWithoutInfo: on a Redis 7 cluster, a Client
// whose ACL user has every command but the @dangerous ones (the usual
// "+@all -@dangerous" rule: INFO is @dangerous) never learns that its
// masters support sharded pub/sub, so it publishes and subscribes with
// plain pub/sub while a Client of a full user uses SPUBLISH/SSUBSCRIBE:
// each misses the other's wake-ups, and a waiter sleeps until the holder's
// lease bound (here 20s; 30s with the watchdog default). The version is
// read from HELLO when INFO is refused. (Found by a reviewer.)
func TestClusterUserWithoutInfo(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Cluster == nil {
			t.Skip("cluster only")
		}
		for _, proto := range []int{3, 2} {
			t.Run("resp"+strconv.Itoa(proto), func(t *testing.T) { userWithoutDangerous(t, b, proto) })
		}
	})
}

func userWithoutDangerous(t *testing.T, b redistest.Backend, proto int) {
	ctx := ctxT(t, 30*time.Second)
	name := redistest.UniqueName(t)
	o := aclUser(t, b.Cluster, "+@all", "-@dangerous")
	o.Protocol = proto
	rdb := redis.NewClusterClient(o)
	t.Cleanup(func() { _ = rdb.Close() })
	restricted := newClientOn(t, rdb)
	full := newClient(t, b)

	for _, dir := range []struct {
		what           string
		holder, waiter *redlatch.Client
	}{
		{"full user's release, restricted user's waiter", full, restricted},
		{"restricted user's release, full user's waiter", restricted, full},
	} {
		h := dir.holder.Mutex(name, redlatch.WithLease(20*time.Second))
		require.NoError(t, h.Lock(ctx))
		got := make(chan error, 1)
		go func() { got <- dir.waiter.Mutex(name).Lock(ctx) }()
		time.Sleep(500 * time.Millisecond) // the waiter subscribed
		start := time.Now()
		require.NoError(t, h.Unlock(ctx))
		select {
		case err := <-got:
			require.NoError(t, err)
			t.Logf("%s: woken after %v", dir.what, time.Since(start))
		case <-time.After(3 * time.Second):
			t.Fatalf("%s: the waiter was not woken by the release", dir.what)
		}
		_, err := dir.holder.Mutex(name).ForceUnlock(ctx)
		require.NoError(t, err)
	}
}

// TestReleaseWithoutChannelPermission: Redis 7 creates ACL users
// with no channel permission (acl-pubsub-default resetchannels), so a user
// made with "ACL SETUSER app on >pw ~* +@all" may not PUBLISH. A release
// whose script then publishes its wake-up (a waiter is known, the latch
// opens, permits are returned) has released already when the PUBLISH is
// refused: Redis does not roll a script back, so the release stays, yet the
// call returns the refusal. The caller is told the release failed, and a
// retried Unlock or Release reports ErrNotHeld; a CountDown that opened the
// latch reports an error too. The scripts publish with pcall: a refused
// wake-up is dropped, and waiters fall back to their lease bound. (Found
// by a reviewer.)
func TestReleaseWithoutChannelPermission(t *testing.T) {
	srv := redistest.NewServer(t)
	ctx := ctxT(t, 30*time.Second)
	adm := srv.Client(t)
	require.NoError(t, adm.Do(ctx, "ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all").Err())
	o := srv.Options()
	o.Username, o.Password = "app", "pw"
	rdb := redis.NewClient(o)
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClientOn(t, rdb)
	other := redlatch.New(srv.Client(t)) // a full user: waits, hears
	t.Cleanup(func() { _ = other.Close() })

	// waitBehind starts a blocked call of other and returns a stop.
	waitBehind := func(f func(context.Context) error) func() {
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = f(wctx) }()
		time.Sleep(300 * time.Millisecond)
		return func() { cancel(); <-done }
	}

	m := c.Mutex("m")
	require.NoError(t, m.Lock(ctx))
	stop := waitBehind(other.Mutex("m").Lock)
	require.NoError(t, m.Unlock(ctx), "Mutex.Unlock with a waiter")
	require.Zero(t, adm.Exists(ctx, "{m}:lock").Val())
	stop()

	rw := c.RWMutex("rw")
	require.NoError(t, rw.Lock(ctx))
	stop = waitBehind(other.RWMutex("rw").RLock)
	require.NoError(t, rw.Unlock(ctx), "RWMutex.Unlock with a waiter")
	stop()

	s := c.Semaphore("s", 1)
	require.NoError(t, s.Acquire(ctx, 1))
	require.NoError(t, s.Release(ctx, 1), "Semaphore.Release")
	avail, err := s.Available(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 1, avail)

	l := c.CountDownLatch("l")
	ok, err := l.TrySetCount(ctx, 1)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, l.CountDown(ctx), "the CountDown that opens the latch")
	n, err := l.Count(ctx)
	require.NoError(t, err)
	require.Zero(t, n)
}

// aclRules are the ACL rules the README lists, but PING and UNSUBSCRIBE.
var aclRules = []string{"~*", "&*", "+@scripting", "+@read", "+@write", "+time", "+publish", "+subscribe", "+multi", "+exec"}

// TestReadmeACLUser: a user with the README's ACL rules but PING and
// UNSUBSCRIBE (with and without +ping) is served: a waiter that gave up
// (its UNSUBSCRIBE refused) does not strand the next one, and the
// subscriber's refused health ping does not drop the connection every two
// intervals. A refused UNSUBSCRIBE was taken for a channel refusal and
// left a confirmation owed, which swallowed the next SUBSCRIBE's: the
// release's wake-up was lost and the waiter slept to its holder's lease
// bound (30s); a refused PING counted as unanswered. (Found by a reread of
// the ACL change.)
func TestReadmeACLUser(t *testing.T) {
	redistest.Together(t, func(run func(string, func(*testing.T))) {
		for _, tc := range []struct {
			name  string
			extra []string
		}{
			{"with ping", []string{"+ping"}},
			{"without ping", nil},
		} {
			run(tc.name, func(t *testing.T) {
				srv := redistest.NewServer(t)
				ctx := ctxT(t, 60*time.Second)
				adm := srv.Client(t)
				args := []any{"ACL", "SETUSER", "app", "reset", "on", ">pw"}
				for _, r := range append(append([]string{}, aclRules...), tc.extra...) {
					args = append(args, r)
				}
				require.NoError(t, adm.Do(ctx, args...).Err())
				o := srv.Options()
				o.Username, o.Password = "app", "pw"
				rdb := redis.NewClient(o)
				t.Cleanup(func() { _ = rdb.Close() })
				dials := &dialCounter{}
				rdb.AddHook(dials)
				c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(3*time.Second)) // health interval 1s
				t.Cleanup(func() { _ = c.Close() })
				name := redistest.UniqueName(t)
				holder := c.Mutex(name, redlatch.WithLease(30*time.Second))
				require.NoError(t, holder.Lock(ctx))

				// A waiter that gives up: its UNSUBSCRIBE goes out.
				wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
				requireWaitErr(t, c.Mutex(name).Lock(wctx), wctx)
				cancel()
				time.Sleep(200 * time.Millisecond)

				got := make(chan error, 1)
				w := c.Mutex(name)
				go func() { got <- w.Lock(ctx) }()
				before := dials.n.Load()
				time.Sleep(3 * time.Second) // three health intervals
				reconnects := dials.n.Load() - before
				start := time.Now()
				require.NoError(t, holder.Unlock(ctx))
				requireNoErrWithin(t, got, 3*time.Second, "the waiter slept through the release")
				t.Logf("woken after %v", time.Since(start))
				require.NoError(t, w.Unlock(ctx))
				require.Zero(t, reconnects, "the subscriber connection was dropped and dialled again while idle")
			})
		}
	})
}
