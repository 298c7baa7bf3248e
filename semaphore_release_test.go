package redlatch_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// TestSemPartialReleaseUnknownOutcome: a Release of part of a record
// (Acquire(3), Release(1)) whose outcome is unknown (here its first send
// fails before reaching Redis) is sent again with a fresh bounded
// context: Redis applies it once, and the 2 permits kept exist
// under their new record. (Without the resend, the first renewal found the
// new record missing, Lost closed, the 2 permits could not be released,
// and the old 3-permit record stayed in Redis until its lease ran out.)
//
// "resend lost too": the resend fails as well. It is sent again, paced,
// within the cleanup timeout: Release returned that error, and the permits
// it returned stayed taken by nobody for their lease. (Before that, Redis
// had the record under its old name still, renewed by the handle, and a
// Release of the kept permits, naming the new record, returned ErrNotHeld.)
func TestSemPartialReleaseUnknownOutcome(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, tc := range []struct {
			name  string
			sends int32
		}{{"resent", 1}, {"resend lost too", 2}} {
			t.Run(tc.name, func(t *testing.T) {
				ctx := ctxT(t, 20*time.Second)
				name := redistest.UniqueName(t)
				const wd = 600 * time.Millisecond
				rdb := b.Client(t)
				// The Release's first sends (a script on the key that is
				// not a renewal: no "p" kind) fail unsent.
				isRelease := func(cmd redis.Cmder) bool {
					return scriptWith(semKey(name))(cmd) && !scriptWith("p")(cmd)
				}
				refuse := []*refuseHook{{nth: 1, match: isRelease}, {nth: 1, match: isRelease}}
				for _, h := range refuse[:tc.sends] {
					rdb.AddHook(h)
				}
				c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(wd))
				s := c.Semaphore(name, 3)
				require.NoError(t, s.Acquire(ctx, 3))
				lost := s.Lost()

				for _, h := range refuse {
					h.armed.Store(true)
				}
				err := s.Release(ctx, 1)
				require.GreaterOrEqual(t, refuse[0].seen.Load(), int32(2), "the Release was not refused, then resent")
				for _, h := range refuse {
					h.armed.Store(false)
				}
				require.NoError(t, err)

				time.Sleep(wd) // a few renewals
				requireOpen(t, lost, "the 2 permits Release kept were reported lost")
				require.NoError(t, s.Release(ctx, 2), "the 2 permits Release kept cannot be released")
			})
		}
	})
}

// renewHook makes every renewal of the permit set key (a renew.lua call:
// its args hold the key and the kind "p"), or every call match matches
// when set (e.g. renewalOf), run on the server but lose its reply, while
// armed; or, with stall set, reach the server only after stall (a slow
// link).
type renewHook struct {
	passHook
	key   string
	match func(redis.Cmder) bool // when set, replaces key
	armed atomic.Bool
	stall time.Duration // when set, a renewal waits this long first, and then runs as usual
}

func (h *renewHook) matches(cmd redis.Cmder) bool {
	if h.match != nil {
		return h.match(cmd)
	}
	if cmd.Name() != "evalsha" && cmd.Name() != "eval" {
		return false
	}
	key, z := false, false
	for _, a := range cmd.Args() {
		if v, ok := a.(string); ok {
			key = key || v == h.key
			z = z || v == "z" || v == "p" // a permit record's renewal
		}
	}
	return key && z
}

func (h *renewHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.armed.Load() || !h.matches(cmd) {
			return next(ctx, cmd)
		}
		if h.stall > 0 {
			time.Sleep(h.stall)
			return next(ctx, cmd)
		}
		if err := next(ctx, cmd); err != nil {
			return err
		}
		cmd.SetErr(io.ErrUnexpectedEOF) // ran on the server, reply lost
		return io.ErrUnexpectedEOF
	}
}

// TestSemReleaseRemovesLostPermits: renewals reach Redis but their replies
// are lost (a slow or flaky link) until the local deadline passes: Lost
// closes, although Redis kept renewing the record. Release reports
// ErrNotHeld, and removes the record from Redis all the same (it was
// unique to that acquisition), so that the permit is free at once instead
// of after up to a whole lease, as a Mutex's Unlock does.
func TestSemReleaseRemovesLostPermits(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const wd = 3 * time.Second
		rdb := b.Client(t)
		hook := &renewHook{key: semKey(name)}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(wd))
		s := c.Semaphore(name, 1)
		other := newClient(t, b).Semaphore(name, 1)

		require.NoError(t, s.Acquire(ctx, 1))
		hook.armed.Store(true)
		requireClosedWithin(t, s.Lost(), 2*wd, "Lost")
		hook.armed.Store(false)
		require.ErrorIs(t, s.Release(ctx, 1), redlatch.ErrNotHeld)

		ttl, err := b.Client(t).PTTL(ctx, semKey(name)).Result()
		require.NoError(t, err)
		t.Logf("permit set PTTL after Release: %v", ttl)
		ok, err := other.TryAcquire(ctx, 1)
		require.NoError(t, err)
		require.True(t, ok, "the lost permit is still taken in Redis after its handle's Release")
		require.NoError(t, other.Release(ctx, 1))
	})
}

// TestSemReleaseNotHeldUpByRenewal: a renewal of the permit set is stuck
// (a slow link) until the permits' local deadline passes: Lost closes. A
// Release then reports ErrNotHeld at once; it waited for the stuck renewal
// first, holding the handle's lock, which also held up Lost and every other
// call on the handle.
func TestSemReleaseNotHeldUpByRenewal(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const wd = 600 * time.Millisecond
		rdb := b.Client(t)
		hook := &renewHook{key: semKey(name), stall: 3 * time.Second}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(wd))
		s := c.Semaphore(name, 1)

		require.NoError(t, s.Acquire(ctx, 1))
		hook.armed.Store(true)
		requireClosedWithin(t, s.Lost(), 2*wd, "Lost")
		released := make(chan error, 1)
		go func() { released <- s.Release(ctx, 1) }()
		select {
		case err := <-released:
			require.ErrorIs(t, err, redlatch.ErrNotHeld)
		case <-time.After(time.Second):
			t.Fatal("Release waited for the stuck renewal")
		}
		hook.armed.Store(false)
	})
}

// copyHook runs one matching script call on the server, keeps a copy of
// its arguments (a resend of it still on the way) and loses its reply; with
// pass set, the reply comes through (the copy is then the first send, stuck
// in a slow link, of a call whose resend answered).
type copyHook struct {
	passHook
	match func(redis.Cmder) bool
	pass  bool
	armed atomic.Bool
	mu    sync.Mutex
	args  []any
}

func (h *copyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.match(cmd) || !h.armed.Load() {
			return next(ctx, cmd)
		}
		if err := next(ctx, cmd); err != nil {
			return err // NOSCRIPT: go-redis sends EVAL next, still armed
		}
		h.armed.Store(false)
		h.mu.Lock()
		h.args = append([]any(nil), cmd.Args()...)
		h.mu.Unlock()
		if h.pass {
			return nil
		}
		cmd.SetErr(io.ErrUnexpectedEOF) // ran on the server, reply lost
		return io.ErrUnexpectedEOF
	}
}

// copy returns the arguments of the call the hook let through.
func (h *copyHook) copy() []any {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.args
}

// TestSemaphoreLateCopyAfterUndoFound: an acquisition ran on the server but
// its reply was lost, so the caller undid it; the undo found the record and
// removed it. A second copy of that same attempt (a client resend stuck in
// a slow link) that reaches Redis after the undo must take nothing, as the
// README promises for every primitive ("the undo leave[s] a tombstone …
// the late acquisition takes nothing"), and as the lock scripts do (an undo
// always leaves a tombstone). Before the fix the semaphore's undo left a
// tombstone only when it did not find the record, so the late copy took
// permits that no handle tracks, renews or releases: they stayed taken for
// a whole lease (here a minute).
func TestSemaphoreLateCopyAfterUndoFound(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		wake := "{" + name + "}:sem:wake"
		hook := &copyHook{match: func(cmd redis.Cmder) bool {
			// The acquire script: it names the permit set, not the channel.
			return scriptWith(semKey(name))(cmd) && !scriptWith(wake)(cmd)
		}}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb)
		s := c.Semaphore(name, 3, redlatch.WithLease(time.Minute))
		other := newClient(t, b).Semaphore(name, 3)

		for _, try := range []bool{true, false} {
			hook.armed.Store(true)
			var err error
			if try {
				_, err = s.TryAcquire(ctx, 2)
			} else {
				err = s.Acquire(ctx, 2)
			}
			require.Error(t, err)
			requireAvailable(t, ctx, other, 3) // the undo returned them

			// The late copy of the very same attempt arrives.
			args := hook.copy()
			require.NotEmpty(t, args)
			_ = b.Client(t).Do(ctx, args...).Err()
			requireAvailable(t, ctx, other, 3)
		}
		require.NoError(t, other.Acquire(ctx, 3))
		require.NoError(t, other.Release(ctx, 3))
		requireSemIdle(t, ctx, b, name)
	})
}

// gateScriptHook, once armed, holds the next call that match accepts until
// proceed is closed (entered is closed when it arrives), then sends it; with
// after set, it sends the call first and holds its reply.
type gateScriptHook struct {
	passHook
	match   func(redis.Cmder) bool
	after   bool
	armed   atomic.Bool
	entered chan struct{}
	proceed chan struct{}
}

func (h *gateScriptHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.match(cmd) || !h.armed.CompareAndSwap(true, false) {
			return next(ctx, cmd)
		}
		var err error
		if h.after {
			err = next(ctx, cmd)
		}
		close(h.entered)
		<-h.proceed
		if !h.after {
			err = next(ctx, cmd)
		}
		return err
	}
}

// TestSemLostDuringPartialRelease: while a Release of part of the handle's
// only record is in flight, the handle still holds the permits it keeps:
// Lost reports the channel closed if those are lost, not nil, which never
// closes (it did: the record was dropped before the script ran and its
// kept part added after). (Found by a reviewer.)
func TestSemLostDuringPartialRelease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		hook := &gateScriptHook{match: scriptWith("{" + name + "}:sem:wake"), entered: make(chan struct{}), proceed: make(chan struct{})}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb)
		s := c.Semaphore(name, 3)
		require.NoError(t, s.Acquire(ctx, 3))
		lost := s.Lost()
		require.NotNil(t, lost)

		hook.armed.Store(true)
		done := make(chan error, 1)
		go func() { done <- s.Release(ctx, 1) }()
		<-hook.entered
		during := s.Lost()
		close(hook.proceed)
		require.NoError(t, <-done)
		require.NotNil(t, s.Lost(), "2 permits held after Release(1)")
		require.Equal(t, lost, during, "Lost during a Release(1) of 3 permits: the handle keeps 2 throughout")
		require.NoError(t, s.Release(ctx, 2))
	})
}

// TestSemaphoreRenewalAfterPause: Redis frozen (SIGSTOP) longer than
// a permit's lease. The holder's Lost closes at its local deadline; the
// renewals its watchdog sent meanwhile are stuck in the frozen server and
// run at SIGCONT, after the record's expiry. While another holder keeps the
// permit set alive, such a renewal must not bring the expired record back:
// nobody tracks it any more, so its permit would stay taken for a whole
// lease. (Found by a reviewer.)
func TestSemaphoreRenewalAfterPause(t *testing.T) {
	srv := redistest.NewServer(t)
	ctx := ctxT(t, 20*time.Second)
	timeout := 900 * time.Millisecond
	c := newClientOn(t, srv.Client(t), redlatch.WithWatchdogTimeout(timeout))
	other := newClientOn(t, srv.Client(t))
	name := redistest.UniqueName(t)

	keeper := other.Semaphore(name, 2, redlatch.WithLease(time.Minute))
	require.NoError(t, keeper.Acquire(ctx, 1)) // keeps the permit set alive
	s := c.Semaphore(name, 2)
	require.NoError(t, s.Acquire(ctx, 1))
	lost := s.Lost()

	time.Sleep(timeout / 2) // one renewal ran: the renewal script is loaded
	srv.Stop(t)
	stopped := true
	t.Cleanup(func() {
		if stopped {
			srv.Cont(t)
		}
	})
	select {
	case <-lost:
	case <-time.After(3 * timeout):
		t.Fatal("Lost did not close while Redis was frozen")
	}
	time.Sleep(timeout) // the frozen server is well past the record's expiry
	srv.Cont(t)
	stopped = false

	time.Sleep(200 * time.Millisecond) // the stuck renewals run
	avail, err := other.Semaphore(name, 2).Available(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(1), avail, "the lost permit came back to life in Redis: nobody tracks it")
}

// TestSemaphoreRenewalAtRecordExpiry: a permit record scored e is live for
// the semaphore scripts until the server clock is past e (sem_reclaim: "as a
// key's expiry does in Redis"; e can be up to 1 ms before its holder's local
// deadline). A renewal that runs at server time e must therefore renew it:
// refusing it tells the holder Lost while the semaphore still counts the
// permit as held, up to 1 ms before the holder's own deadline. The server
// clock (miniredis) is frozen at e so that the boundary is hit exactly.
// (Found by a reviewer.)
func TestSemaphoreRenewalAtRecordExpiry(t *testing.T) {
	ctx := ctxT(t, 20*time.Second)
	m, rdb, t0 := frozenMiniredis(t)
	timeout := 900 * time.Millisecond
	c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(timeout))

	s := c.Semaphore("sem-at-expiry", 1)
	require.NoError(t, s.Acquire(ctx, 1)) // its record scores t0 + timeout
	m.SetTime(t0.Add(timeout))            // the server clock reaches the record's expiry

	avail, err := s.Available(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(0), avail, "the semaphore scripts count the record live at its score")

	select {
	case <-s.Lost():
		t.Fatal("a renewal at the record's expiry ms told the holder Lost while the semaphore still counts its permit")
	case <-time.After(timeout / 2): // one renewal (every timeout/3) ran
	}
	m.SetTime(t0.Add(timeout + 100*time.Millisecond))
	avail, err = s.Available(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(0), avail, "the renewal did not move the record's expiry")
	require.NoError(t, s.Release(ctx, 1))
}

// TestSemaphoreResentPartialRelease: a Release of two records, one of which
// Redis no longer has (it expired), returns the other and reports
// ErrNotHeld, as documented. When the reply of that very Release is lost
// and go-redis resends it, the resend reported success (the script
// answered "everything it meant to return" to a release it knew), hiding
// that permits the handle believed it held had lapsed. A release that fell
// short is now remembered as such. Found by a reviewer.
func TestSemaphoreResentPartialRelease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 10*time.Second)
		name := redistest.UniqueName(t)
		c, hook := lossyClient(t, b, scriptWith(semKey(name)), true)
		rdb := b.Client(t)
		for _, lose := range []bool{false, true} {
			s := c.Semaphore(name, 3)
			require.NoError(t, s.Acquire(ctx, 1))
			require.NoError(t, s.Acquire(ctx, 1))
			// One of the two records lapses in Redis (its score in the past),
			// before the watchdog notices.
			ms, err := rdb.ZRange(ctx, semKey(name), 0, -1).Result()
			require.NoError(t, err)
			var recs []string
			for _, m := range ms {
				if strings.Contains(m, "|") {
					recs = append(recs, m)
				}
			}
			require.Len(t, recs, 2)
			require.NoError(t, rdb.ZAdd(ctx, semKey(name), redis.Z{Score: 1, Member: recs[0]}).Err())

			hook.armed.Store(lose) // the release runs twice on the server
			err = s.Release(ctx, 2)
			require.ErrorIs(t, err, redlatch.ErrNotHeld, "lost reply %v: a Release that returned 1 of its 2 permits", lose)
			requireAvailable(t, ctx, s, 3)
		}
	})
}

// TestSemaphoreAfterReleaseMemoryOnMiniredis: a Release is remembered in
// the permit set as '~<request id>' for a minute. Once that member has expired
// while the set lives on (another handle still holds a permit), the next
// script reclaims it and counts its permits with sem_n, which did
// tonumber(string.match(member, '|(%d+)$')): the match fails on a
// remembered release, and gopher-lua (miniredis, redlatch's own test
// backend and the examples' default) refuses tonumber() of it. Every
// semaphore script then failed (Available, Acquire, TryAcquire, Release)
// for as long as any permit was held: on a watchdog-renewed holder, for
// good. The server clock (miniredis) is moved past the memory. (Found by
// a reviewer.)
func TestSemaphoreAfterReleaseMemoryOnMiniredis(t *testing.T) {
	ctx := ctxT(t, 20*time.Second)
	m, rdb, t0 := frozenMiniredis(t)
	c := newClientOn(t, rdb)

	keeper := c.Semaphore("sem-memory", 2, redlatch.WithLease(time.Hour))
	require.NoError(t, keeper.Acquire(ctx, 1)) // keeps the permit set alive
	s := c.Semaphore("sem-memory", 2)
	require.NoError(t, s.Acquire(ctx, 1))
	require.NoError(t, s.Release(ctx, 1)) // remembered for a minute

	m.SetTime(t0.Add(61 * time.Second)) // the remembered release has expired
	n, err := s.Available(ctx)
	require.NoError(t, err, "Available after a remembered release expired")
	require.Equal(t, int64(1), n)
	ok, err := s.TryAcquire(ctx, 1)
	require.NoError(t, err, "TryAcquire after a remembered release expired")
	require.True(t, ok)
	require.NoError(t, s.Release(ctx, 1))
	require.NoError(t, keeper.Release(ctx, 1))
}

// frozenMiniredis starts a miniredis whose server clock stands at t0 (now,
// to the millisecond) until the test moves it, and a client of it.
func frozenMiniredis(t *testing.T) (*miniredis.Miniredis, *redis.Client, time.Time) {
	t.Helper()
	m := miniredis.RunT(t)
	t0 := time.Now().Truncate(time.Millisecond)
	m.SetTime(t0)
	rdb := redis.NewClient(&redis.Options{Addr: m.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	return m, rdb, t0
}

// TestSemLateAcquireLostPermitsReturned: a WithLease acquisition whose
// script reached Redis late (a pool wait, a retry: here held back 400ms,
// longer than the 300ms lease) is lost at once locally, but Redis holds its
// permit for a whole lease from when the script ran. A later Acquire on the
// handle must not forget that record before Redis is done with it: the
// next Release returns it (as it does for any lost record, in case Redis
// kept it). The handle forgot it at the second Acquire, and the permit
// stayed taken after a Release that returned everything the handle held.
func TestSemLateAcquireLostPermitsReturned(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		var armed atomic.Bool
		rdb.AddHook(delayHook{match: armedOnce(&armed, scriptWith("{"+name+"}:sem")), d: 400 * time.Millisecond})
		c := newClientOn(t, rdb)
		s := c.Semaphore(name, 2, redlatch.WithLease(300*time.Millisecond))
		require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded: no NOSCRIPT resend skips the hook
		require.NoError(t, s.Release(ctx, 1))

		armed.Store(true)
		require.NoError(t, s.Acquire(ctx, 1)) // its script runs 400ms late
		requireClosedWithin(t, s.Lost(), 50*time.Millisecond, "a permit whose reply came after its lease ran out is lost")
		require.NoError(t, s.Acquire(ctx, 1))
		require.NoError(t, s.Release(ctx, 1))
		n, err := s.Available(ctx)
		require.NoError(t, err)
		require.Equal(t, int64(2), n, "the late permit, still held in Redis, was not returned by Release")
	})
}

// TestSemaphoreReleaseResentAfterMemory: a Release whose replies are lost
// is resent by go-redis (MaxRetries 3, after a ReadTimeout of 3s each: the
// last copy leaves about 9-10.5s after the first) and then once more by
// Release itself (with a fresh cleanup context, about 12-14s after the
// first). The first copy returned the permits; a later copy must report
// that, not ErrNotHeld. The permit set remembered a release for 10s only,
// and a copy 15s later found the set gone (it outlived its last permit by
// that memory) and reported ErrNotHeld for permits it had returned. The
// server clock (miniredis) is moved 15s on between the two runs.
func TestSemaphoreReleaseResentAfterMemory(t *testing.T) {
	ctx := ctxT(t, 20*time.Second)
	m, rdb, t0 := frozenMiniredis(t)
	hook := &lossyHook{match: scriptWith(semKey("sem-resent-late")), retry: true}
	rdb.AddHook(hook)
	c := newClientOn(t, rdb)

	s := c.Semaphore("sem-resent-late", 2, redlatch.WithLease(time.Minute))
	require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded: no NOSCRIPT reply spends the hook
	require.NoError(t, s.Release(ctx, 1))
	require.NoError(t, s.Acquire(ctx, 1))
	hook.between = func() {
		m.SetTime(t0.Add(15 * time.Second))
		m.FastForward(15 * time.Second)
	}
	hook.armed.Store(true)
	require.NoError(t, s.Release(ctx, 1), "the release returned its permit, but its resend reported otherwise")
	requireAvailable(t, ctx, s, 2)
}

// TestSemSlowPartialReleaseKeepsRenewing: a Release of part of a record
// (Acquire(3), Release(1)) that takes longer than the watchdog timeout (a
// slow link: here its script reaches Redis, or its reply comes back, a
// second late with a 600ms watchdog timeout) must not cost the handle the
// 2 permits it keeps: the watchdog keeps them alive as it does any permit
// the handle holds (Redisson #3046). The watchdog stopped renewing the
// record for as long as the Release was in flight, so the record expired
// under its live holder: the Release reported ErrNotHeld for a permit the
// handle held (script late), or Lost closed just after it (reply late),
// and the 2 kept permits were gone.
func TestSemSlowPartialReleaseKeepsRenewing(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, late := range []bool{false, true} {
			ctx := ctxT(t, 20*time.Second)
			name := redistest.UniqueName(t)
			const wd = 600 * time.Millisecond
			rdb := b.Client(t)
			var armed atomic.Bool
			// The release script: it names the wake-up channel.
			rdb.AddHook(delayHook{match: armedOnce(&armed, scriptWith("{"+name+"}:sem:wake")), d: wd + 400*time.Millisecond, late: late})
			c := newClientOn(t, rdb, redlatch.WithWatchdogTimeout(wd))
			s := c.Semaphore(name, 3)
			require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded: no NOSCRIPT resend skips the hook
			require.NoError(t, s.Release(ctx, 1))

			require.NoError(t, s.Acquire(ctx, 3))
			lost := s.Lost()
			armed.Store(true)
			require.NoError(t, s.Release(ctx, 1), "late %v: a slow Release(1) of 3 permits held", late)
			time.Sleep(wd) // a few renewals
			requireOpen(t, lost, "the 2 permits a slow Release kept were lost")
			requireAvailable(t, ctx, s, 1)
			require.NoError(t, s.Release(ctx, 2), "late %v: the 2 permits a slow Release kept", late)
			requireAvailable(t, ctx, s, 3)
		}
	})
}

// TestSemLostDuringSlowPartialRelease: the WithLease permits a Release(1)
// of 3 keeps run out while that Release is in flight (its script held
// back): Lost closes at their deadline, as for any permit the handle
// holds, not only once the Release returns (it waited for the reply: a
// releasing hold was never lost by its deadline). A permit the handle
// takes meanwhile is a new acquisition after a loss, with a Lost channel
// of its own, which the loss of the kept permits, reported already, must
// not close when the Release returns.
func TestSemLostDuringSlowPartialRelease(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		const lease = 500 * time.Millisecond
		rdb := b.Client(t)
		hook := &gateScriptHook{match: scriptWith("{" + name + "}:sem:wake"), entered: make(chan struct{}), proceed: make(chan struct{})}
		rdb.AddHook(hook)
		c := newClientOn(t, rdb)
		s := c.Semaphore(name, 3, redlatch.WithLease(lease))
		require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded: no NOSCRIPT resend skips the hook
		require.NoError(t, s.Release(ctx, 1))

		require.NoError(t, s.Acquire(ctx, 3))
		lost := s.Lost()
		hook.armed.Store(true)
		done := make(chan error, 1)
		go func() { done <- s.Release(ctx, 1) }()
		<-hook.entered
		requireClosedWithin(t, lost, 2*lease, "Lost while the kept permits ran out during a Release")

		require.NoError(t, s.Acquire(ctx, 1)) // the expired record is reclaimed
		fresh := s.Lost()
		require.NotEqual(t, lost, fresh, "a new acquisition after a loss has a new Lost channel")
		close(hook.proceed)
		require.ErrorIs(t, <-done, redlatch.ErrNotHeld)
		requireOpen(t, fresh, "the loss of the kept permits, reported already, closed the new acquisition's Lost")
		require.NoError(t, s.Release(ctx, 1))
	})
}

// TestSemConcurrentAcquireKeepsLateLostPermit: two Acquires on one WithLease
// handle (1s lease). X is sent first, but its script reaches Redis 600ms
// late; Y, sent 300ms after X, runs first (the set empty: it counts 1
// permit in use, its own), and its reply is held back. X's local deadline
// passes (Lost closes), yet Redis holds X's permit a whole lease from when
// its script ran. When Y's reply comes, "no permit in use but Y's" is no
// proof that Redis ended X: X's script ran after Y's. The handle forgot X
// there, and the Release that returned all it held left X's permit taken in
// Redis (lost records are returned by the next Release, see Release).
func TestSemConcurrentAcquireKeepsLateLostPermit(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		rdb := b.Client(t)
		gate := &gateScriptHook{match: scriptWith("{" + name + "}:sem"), after: true, entered: make(chan struct{}), proceed: make(chan struct{})}
		rdb.AddHook(gate)
		var armed atomic.Bool
		xHeld := make(chan struct{})
		rdb.AddHook(delayHook{match: armedOnce(&armed, scriptWith("{"+name+"}:sem")), d: 600 * time.Millisecond, once: new(sync.Once), entered: xHeld})
		c := newClientOn(t, rdb)
		s := c.Semaphore(name, 2, redlatch.WithLease(time.Second))
		require.NoError(t, s.Acquire(ctx, 1)) // scripts loaded: no NOSCRIPT resend skips the hooks
		require.NoError(t, s.Release(ctx, 1))

		armed.Store(true)
		x := make(chan error, 1)
		go func() { x <- s.Acquire(ctx, 1) }() // X: its script reaches Redis 600ms late
		<-xHeld
		time.Sleep(300 * time.Millisecond)
		gate.armed.Store(true)
		y := make(chan error, 1)
		go func() { y <- s.Acquire(ctx, 1) }() // Y: its script runs now, before X's; its reply is held
		<-gate.entered

		require.NoError(t, <-x)
		requireClosedWithin(t, s.Lost(), 2*time.Second, "X's lease ran out locally")
		close(gate.proceed)
		require.NoError(t, <-y)
		require.NoError(t, s.Release(ctx, 1)) // Y, and X's record in case Redis still has it
		n, err := s.Available(ctx)
		require.NoError(t, err)
		require.Equal(t, int64(2), n, "X's permit, still held in Redis, was not returned by the Release of all the handle held")
	})
}

// TestSemaphoreKeptPermitsNotLostOnRefusedRelease: a Release that shrinks a
// permit record (returns part of an acquisition) and that Redis refuses
// with a transient reply error (BUSY: another client's script runs past
// busy-reply-threshold) changed nothing in Redis: the record still holds
// the permits under its old name, with its lease. The permits the handle
// keeps were tracked under the record's new name only, so the first
// renewal after the refusal found them "gone" and Lost closed while Redis
// still held them, renewed until then; the record was then left to expire.
// Kept permits must stay renewed, as a partial Unlock's hold does, and
// releasable: tracked under the record's new name, their Release then
// returned ErrNotHeld. (Found by a reviewer.)
func TestSemaphoreKeptPermitsNotLostOnRefusedRelease(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	ctx := ctxT(t, 20*time.Second)
	const timeout = 1500 * time.Millisecond // renewals every 500ms
	c := newClientOn(t, srv.Client(t), redlatch.WithWatchdogTimeout(timeout))
	s := c.Semaphore(redistest.UniqueName(t), 3)
	require.NoError(t, s.Acquire(ctx, 2))
	lost := s.Lost()

	// Another client's script keeps Redis busy for 600ms (less than the
	// part of the lease left after the last renewal before it).
	busy := srv.BusyFor(t, 600*time.Millisecond)

	err := s.Release(ctx, 1)
	require.Error(t, err)
	require.True(t, strings.HasPrefix(err.Error(), "BUSY"), "%v", err)
	require.NoError(t, <-busy)

	// Nothing was released: Redis holds the 2 permits, and the handle keeps
	// renewing them.
	time.Sleep(timeout + timeout/2) // three renewals after the busy script
	requireOpen(t, lost, "kept permits reported lost after a refused Release, Redis still holding them")
	n, err := s.Available(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 1, n)
	require.NoError(t, s.Release(ctx, 1), "the kept permit")
	n, err = s.Available(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 3, n, "the permit the refused Release returned comes back with the kept one")
}

// TestSemReleaseAfterRefusedShrinkReportsGone: after a partial Release that
// Redis refused (BUSY), the kept permits are tracked under the record's old
// name, whose member names all the record's permits (3), not the 1 kept. A
// later Release of the kept permit and of a newer permit that Redis no
// longer has frees 3 permits, at least the 2 asked for, and reported
// success: it must report ErrNotHeld, as it does for any record found gone.
// (Found by a reviewer of that fix.)
func TestSemReleaseAfterRefusedShrinkReportsGone(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	ctx := ctxT(t, 20*time.Second)
	rdb := srv.Client(t)
	c := newClientOn(t, srv.Client(t))
	name := redistest.UniqueName(t)
	s := c.Semaphore(name, 5)
	require.NoError(t, s.Acquire(ctx, 3))

	busy := srv.BusyFor(t, 300*time.Millisecond)
	err := s.Release(ctx, 2)
	require.Error(t, err)
	require.True(t, strings.HasPrefix(err.Error(), "BUSY"), "%v", err)
	require.NoError(t, <-busy)

	old, err := rdb.ZRange(ctx, semKey(name), 0, -1).Result()
	require.NoError(t, err)
	require.NoError(t, s.Acquire(ctx, 1))
	ms, err := rdb.ZRange(ctx, semKey(name), 0, -1).Result()
	require.NoError(t, err)
	var fresh string
	for _, m := range ms {
		if !strings.Contains(strings.Join(old, "\n"), m) && strings.Contains(m, "|") {
			fresh = m
		}
	}
	require.NotEmpty(t, fresh, "%v", ms)
	require.NoError(t, rdb.ZRem(ctx, semKey(name), fresh).Err()) // Redis lost it

	require.ErrorIs(t, s.Release(ctx, 2), redlatch.ErrNotHeld, "the newer permit was gone from Redis")
}

// again, as Mutex.Unlock and the semaphore's own undo do (see
// Client.resendRelease), they stay taken by nobody for their whole lease
// (30s here), and every other holder waits that long. (Found by a
// reviewer.)
func TestSemaphoreRefusedReleaseResent(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	c := newClientOn(t, srv.Client(t)) // default watchdog timeout: 30s leases
	s := c.Semaphore(name, 2)
	require.NoError(t, s.Acquire(ctx, 2))

	// Busy until the script is killed: the Release is refused for sure.
	end := busyServer(t, ctx, srv, srv.Client(t))
	err := s.Release(ctx, 2)
	require.Error(t, err)
	require.True(t, strings.HasPrefix(err.Error(), "BUSY"), "%v", err)
	end()

	requireReleasedPermits(t, ctx, srv, s, name,
		"the BUSY-refused Release was not resent: the permits stay taken by nobody for their lease")
}

// requireReleasedPermits requires s, whose 2 permits were just released,
// to hold none any more (a second Release says so), and another Client to
// get the 2 permits of name well before their 30s lease runs out.
func requireReleasedPermits(t *testing.T, ctx context.Context, srv *redistest.Server, s *redlatch.Semaphore, name, why string) {
	t.Helper()
	require.ErrorIs(t, s.Release(ctx, 2), redlatch.ErrNotHeld)
	other := newClientOn(t, srv.Client(t)).Semaphore(name, 2)
	actx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	require.NoError(t, other.Acquire(actx, 2), why)
	require.NoError(t, other.Release(ctx, 2))
}

// lostThenBusyHook fails the first call that match accepts unsent, as a
// lost reply (go-redis's retries failed), making the server busy first:
// the Release's own resend of that call is refused with a real BUSY. The
// next call after that one ends the busy spell before it is sent.
type lostThenBusyHook struct {
	passHook
	match func(redis.Cmder) bool
	armed atomic.Bool
	seen  atomic.Int32
	busy  func() // makes the server busy
	end   func() // ends the busy spell
	ended atomic.Bool
}

func (h *lostThenBusyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.armed.Load() || !h.match(cmd) {
			return next(ctx, cmd)
		}
		switch h.seen.Add(1) {
		case 1:
			h.busy()
			cmd.SetErr(io.ErrUnexpectedEOF)
			return io.ErrUnexpectedEOF
		case 2:
			return next(ctx, cmd) // BUSY
		default:
			if h.ended.CompareAndSwap(false, true) {
				h.end()
			}
			return next(ctx, cmd)
		}
	}
}

// TestSemReleaseResendRefusedBusyResent: a Release whose first send gets no
// reply is sent once more (see Semaphore.Release); when that resend is
// refused by a busy Redis (BUSY: it did not run, and neither, here, did
// the first send), the release was dropped: the handle no longer tracks
// the permits (no renewal, a second Release reports ErrNotHeld), while
// Redis keeps them for their whole lease (30s here), held by nobody. A
// Release refused so on its first send is resent
// (TestSemaphoreRefusedReleaseResent), as Mutex.Unlock's release is; this
// one must be too. (Found by a reviewer.)
func TestSemReleaseResendRefusedBusyResent(t *testing.T) {
	srv := redistest.NewServer(t)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	hooked := srv.Client(t)
	var end func()
	hook := &lostThenBusyHook{match: scriptWith("{" + name + "}:sem:wake")}
	hook.busy = func() { end = busyServer(t, ctx, srv, srv.Client(t)) }
	hook.end = func() { end() }
	hooked.AddHook(hook)
	c := newClientOn(t, hooked) // default watchdog timeout: 30s leases
	s := c.Semaphore(name, 2)
	require.NoError(t, s.Acquire(ctx, 2))

	hook.armed.Store(true)
	relErr := s.Release(ctx, 2)
	require.GreaterOrEqual(t, hook.seen.Load(), int32(2), "the Release was not resent")
	if hook.ended.CompareAndSwap(false, true) {
		end()
	}
	requireReleasedPermits(t, ctx, srv, s, name,
		"the Release refused BUSY on its resend was dropped: the permits stay taken by nobody for their lease")
	require.NoError(t, relErr, "the permits were returned")
}

// TestSemReleaseWrongTypeNotResentUntilCleanupTimeout: a Release whose
// permit set was replaced by another program's value (WRONGTYPE, a reply:
// the script's outcome is known) returns ErrWrongType with its ctx. The
// resend loop took the ErrWrongType (which wraps the reply's text, not the
// reply) for an unknown outcome and resent it, paced, until the cleanup
// timeout: Release returned ~2s after a 300ms ctx. ErrWrongType wraps the
// reply now, as convertErr's other errors do. (Found by a reviewer.)
func TestSemReleaseWrongTypeNotResentUntilCleanupTimeout(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx := ctxT(t, 20*time.Second)
		name := redistest.UniqueName(t)
		c := newClient(t, b)
		s := c.Semaphore(name, 3)
		require.NoError(t, s.Acquire(ctx, 1))
		require.NoError(t, b.Client(t).Set(ctx, semKey(name), "foreign", time.Minute).Err())

		rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		err := s.Release(rctx, 1)
		took := time.Since(start)
		require.ErrorIs(t, err, redlatch.ErrWrongType)
		require.Less(t, took, time.Second, "Release returned %v after a 300ms ctx", took)
	})
}

// TestSemPartialReleaseRunThenRefusedPastTryAgainWait: on a Redis Cluster,
// a partial Semaphore Release (3 permits held in one record, 1 released:
// the record is renamed to one of 2 permits) runs in Redis, its reply is
// lost, and go-redis's resend is refused because the slot has started
// migrating (TRYAGAIN: the wake-up channel, a KEYS entry, never exists
// where it lands). tryAgainHook sends it again for tryAgainWait (5s) and
// returns the TRYAGAIN reply, which Release took for "did not run": the
// handle tracked the kept permits under the record's old name, which is
// gone (Lost closed at the next renewal), while the new record, renewed by
// nobody, kept 2 permits taken for its whole lease. The Release of those 2
// permits then reported ErrNotHeld and returned nothing. (lost=false: the
// same Release refused all along, which did not run, still works.) (Found
// by a reviewer.)
func TestSemPartialReleaseRunThenRefusedPastTryAgainWait(t *testing.T) {
	t.Parallel() // see TestMain
	for _, lost := range []bool{true, false} {
		t.Run(fmt.Sprintf("lost=%v", lost), func(t *testing.T) {
			t.Parallel() // each on a cluster of its own; most of it is waiting
			cl := redistest.NewCluster(t, 3)
			ctx := ctxT(t, 60*time.Second)
			name := nameOn(t, cl, 1, redistest.UniqueName(t))
			tag := "{" + name + "}"
			cc := cl.Client(t)
			s := newClientOn(t, cc).Semaphore(name, 5)
			// The slot map is loaded, the scripts too.
			require.NoError(t, s.Acquire(ctx, 2))
			require.NoError(t, s.Release(ctx, 1))
			require.NoError(t, s.Release(ctx, 1))

			require.NoError(t, s.Acquire(ctx, 3))
			migrate := func() { cl.StartMigration(t, 2, tag+":fence") }
			if lost {
				// Inside tryAgainHook: the Release runs, then its slot
				// starts migrating and go-redis's resend is refused from
				// then on.
				cc.AddHook(&lostThenRefused{key: semKey(name), migrate: migrate})
			} else {
				migrate()
			}
			err := s.Release(ctx, 1)
			require.Error(t, err)
			var reply redis.Error
			refused := errors.As(err, &reply)
			cl.MoveSlot(t, redistest.KeySlot(tag), 2)

			// The handle holds 2 permits: their Release gives them back.
			require.NoError(t, s.Release(ctx, 2), "the kept permits of a partial Release were not tracked by their name")
			avail, err := newClientOn(t, cl.Client(t)).Semaphore(name, 5).Available(ctx)
			require.NoError(t, err)
			require.Equal(t, int64(5), avail, "permits left taken by nobody")
			if lost {
				require.False(t, refused, "a Release that ran reported a refusal (did not run): %v", err)
			}
		})
	}
}

// TestSemPartialReleaseRefusedUntilCtxEndsKeptName: on a Redis Cluster, a
// partial Semaphore Release (3 permits held in one record, 1 released) is
// refused by a migrating slot until its ctx ends (ended in tryAgainHook's
// backoff: a refusedErr, ctx's error), and its resend within the cleanup
// timeout is refused too: the script never ran, and Redis has the record
// under its old name, with 3 permits, which the bridge hold renews. The
// handle tracked the 2 kept permits under the record's new name (only a
// refusal past tryAgainWait had the name read with recordExists): once the
// slot moved, their Release named a record Redis never had, returned
// ErrNotHeld and returned nothing, and the 3 permits stayed taken by
// nobody for their lease. (Found by a reviewer of 0754c73.)
func TestSemPartialReleaseRefusedUntilCtxEndsKeptName(t *testing.T) {
	t.Parallel() // see TestMain
	ctx, cl, _, c, hook := cancelOnTryAgainRig(t)
	name := nameOn(t, cl, 1, redistest.UniqueName(t))
	tag := "{" + name + "}"
	s := c.Semaphore(name, 5)
	// The slot map is loaded, the scripts too.
	require.NoError(t, s.Acquire(ctx, 2))
	require.NoError(t, s.Release(ctx, 1))
	require.NoError(t, s.Release(ctx, 1))

	require.NoError(t, s.Acquire(ctx, 3))
	cl.StartMigration(t, 2, tag+":fence")
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	hook.arm(semKey(name), cancel) // rctx ends at the first TRYAGAIN
	err := s.Release(rctx, 1)
	require.ErrorIs(t, err, context.Canceled, "refused until its ctx ended, then resent and refused again")
	cl.MoveSlot(t, redistest.KeySlot(tag), 2)

	// The handle holds 2 permits: their Release gives them back.
	require.NoError(t, s.Release(ctx, 2), "the kept permits were tracked under a name Redis never had")
	avail, err := newClientOn(t, cl.Client(t)).Semaphore(name, 5).Available(ctx)
	require.NoError(t, err)
	require.Equal(t, int64(5), avail, "permits left taken by nobody")
}

// TestSemPartialReleaseRunThenBusyKeptName: a partial Semaphore Release (3
// permits held in one record, 1 released: the script renames the record to
// one of 2 permits) runs in Redis, its reply is lost, and go-redis's resend
// is refused BUSY (another client's script runs past busy-reply-threshold).
// Release took the BUSY for "did not run" and tracked the 2 kept permits
// under the record's old name, which Redis no longer has: their Release
// returned ErrNotHeld and gave nothing back, and the renamed record stayed
// taken by nobody for its lease (Lost closing at the next renewal). The
// migrating-slot case was fixed in 0754c73; a busy Redis's refusal says no
// more about the first send than a migrating slot's: the record's name in
// Redis tells, read once Redis answers.
// (Found by a reviewer.)
func TestSemPartialReleaseRunThenBusyKeptName(t *testing.T) {
	t.Parallel() // see TestMain

	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	b := serverBackend(srv)
	ctx := ctxT(t, 20*time.Second)
	name := redistest.UniqueName(t)
	c, hook := lossyClient(t, b, scriptWith("{"+name+"}:sem:wake"), true)
	s := c.Semaphore(name, 5)
	// The scripts are loaded.
	require.NoError(t, s.Acquire(ctx, 1))
	require.NoError(t, s.Release(ctx, 1))

	require.NoError(t, s.Acquire(ctx, 3))
	var busy <-chan error
	hook.between = func() { busy = srv.BusyFor(t, 500*time.Millisecond) }
	hook.armed.Store(true) // it runs; go-redis's resend is refused BUSY
	err := s.Release(ctx, 1)
	waitNotBusy(t, srv, busy)
	require.False(t, hook.armed.Load())
	// The handle holds 2 permits: their Release gives them back.
	require.NoError(t, s.Release(ctx, 2), "the kept permits of a partial Release were tracked under a name Redis no longer has")
	requireAvailable(t, ctx, newClientOn(t, srv.Client(t)).Semaphore(name, 5), 5)
	_ = err // BUSY: the caller gets the refusal (see Semaphore.Release)
}
