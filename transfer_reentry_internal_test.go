package redlatch

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// ownerGate, once armed, holds the next call of script by owner: before
// it is sent (closing held), or with late set after it ran, its reply
// delayed (closing held), until proceed is closed.
type ownerGate struct {
	passHook
	script *redis.Script
	owner  string
	late   bool
	lose   bool // the call runs in Redis, and its caller gets its ctx's error (a lost reply)
	drop   bool // the call fails without being sent (a network error; held is closed)
	// fail, run, ran: a call stuck on its way (see newLateGate)
	fail, run, ran chan struct{}
	mu             sync.Mutex
	armed          bool
	stuck          string // the request id of a call stuck on its way: its resends fail until run
	held           chan struct{}
	proceed        chan struct{}
}

func newOwnerGate(script *redis.Script, owner string, late bool) *ownerGate {
	return &ownerGate{script: script, owner: owner, late: late, held: make(chan struct{}), proceed: make(chan struct{})}
}

func (g *ownerGate) arm() {
	g.mu.Lock()
	g.armed = true
	g.mu.Unlock()
}

func (g *ownerGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if strings.ToLower(cmd.Name()) != "evalsha" || len(args) < 4 || args[1] != g.script.Hash() {
			return next(ctx, cmd)
		}
		nkeys, _ := args[2].(int)
		if len(args) <= 3+nkeys || args[3+nkeys] != g.owner {
			return next(ctx, cmd)
		}
		g.mu.Lock()
		gate := g.armed
		g.armed = false
		var req string // ARGV[2], the request id (unlock.lua)
		if len(args) > 4+nkeys {
			req, _ = args[4+nkeys].(string)
		}
		resend := g.stuck != "" && req == g.stuck
		if gate && g.fail != nil {
			g.stuck = req
		}
		g.mu.Unlock()
		if resend {
			select {
			case <-g.run:
			default:
				// The link is still stuck: a resend of the stuck call
				// (see Client.resendRelease) does not get through either.
				cmd.SetErr(errLateTimeout)
				return errLateTimeout
			}
		}
		if !gate {
			return next(ctx, cmd)
		}
		if g.drop || g.fail != nil {
			close(g.held)
			if g.fail != nil {
				<-g.fail
				copied := redis.NewCmd(context.WithoutCancel(ctx), slices.Clone(args)...)
				go func() {
					<-g.run
					_ = next(context.WithoutCancel(ctx), copied)
					close(g.ran)
				}()
			}
			cmd.SetErr(errLateTimeout)
			return errLateTimeout
		}
		run := func() error {
			if !g.lose {
				return next(ctx, cmd)
			}
			_ = next(context.WithoutCancel(ctx), cmd)
			err := ctx.Err() // the test cancels it meanwhile
			if err == nil {
				err = context.Canceled
			}
			cmd.SetErr(err)
			return err
		}
		if g.late {
			err := run()
			close(g.held)
			<-g.proceed
			return err
		}
		close(g.held)
		<-g.proceed
		return run()
	}
}

// TestTransferToWaiterThatReentered: two goroutines share a ReentrantMutex.
// The second one's Lock registers as a waiter (the Client has another
// waiter on the lock: a Redlock here) and re-enters the hold with its own
// attempt; before that Lock has left the waiters, the first goroutine's
// Unlock reserves it for a local transfer. The second goroutine unlocks,
// then the first Unlock's script runs: the count reaches 0 and the script
// hands the lock to the second goroutine's acquisition, which is over (it
// re-entered the previous hold). Nobody tracks, renews or releases that
// transferred hold: the owner still holds the lock after each Lock had its
// Unlock, and every other owner waits for a whole lease. "lost reply": the
// first Unlock's reply is lost (its ctx ends meanwhile); unsure whether the
// transfer happened, it gave it back only when the waiter had left without
// the lock, and this one left with one (the re-entered hold): it now gives
// back the owner's hold when its token is not the waiter's. (Found by a
// reviewer.)
func TestTransferToWaiterThatReentered(t *testing.T) {
	for _, tc := range []struct {
		name             string
		lost, reentering bool
	}{{"reply", false, false}, {"lost reply", true, false}, {"reentering", false, true}, {"reentering, lost reply", true, true}} {
		t.Run(tc.name, func(t *testing.T) { transferToWaiterThatReentered(t, tc.lost, tc.reentering) })
	}
}

// transferToWaiterThatReentered runs TestTransferToWaiterThatReentered;
// with reentering, two handles share a WithOwner id (one owner: either may
// release what the other took), and the waiter is still inside its
// re-entry when the Unlock's outcome is known: h1 holds the lock; h2's Lock
// registers as a waiter and re-enters the hold with its own attempt, whose
// reply is still on the way; h1 unlocks twice: the first Unlock ends its
// own count, the second ends the count of h2's re-entry and, having
// reserved h2's waiter, hands the lock to h2's acquisition in Redis. With
// its reply lost, the Unlock only marked the waiter unsure; the waiter then
// left with the hold it re-entered (acquired: the mark was ignored), and
// nobody gave back the transferred hold. The waiter's cleanup now gives
// back the owner's hold when its token is not the one the waiter left
// with. (Found by a reviewer.)
func transferToWaiterThatReentered(t *testing.T, lost, reentering bool) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, rdb := plainClient(t, b)
		name := redistest.UniqueName(t)
		h1 := c.ReentrantMutex(name)
		h2 := h1 // a second goroutine
		if reentering {
			h1 = c.ReentrantMutex(name, WithOwner("shared-owner"))
			h2 = c.ReentrantMutex(name, WithOwner("shared-owner"))
		}
		lockHook := newOwnerGate(lockScript, h1.e.owner, true)
		gate := newOwnerGate(unlockScript, h1.e.owner, false)
		gate.lose = lost
		rdb.AddHook(lockHook)
		rdb.AddHook(gate)
		require.NoError(t, h1.Lock(ctx)) // loads the scripts
		require.NoError(t, h1.Unlock(ctx))

		require.NoError(t, h1.Lock(ctx)) // goroutine 1
		rl, rlDone := redlockWaiting(t, ctx, c, name, h1.e.channel)

		lockHook.arm()
		g2 := make(chan error, 1)
		go func() { g2 <- h2.Lock(ctx) }() // goroutine 2: joins, then re-enters
		<-lockHook.held                    // count 2; the reply is on its way
		if reentering {
			require.NoError(t, h1.Unlock(ctx)) // count 1
		}
		gate.arm()
		uctx, ucancel := context.WithCancel(ctx)
		defer ucancel()
		g1 := make(chan error, 1)
		go func() { g1 <- h1.Unlock(uctx) }() // reserves goroutine 2's waiter
		<-gate.held
		c.ps.mu.Lock()
		reserved := slices.ContainsFunc(c.ps.chans[h1.e.channel].waiters, func(w *waiter) bool { return w.reserved })
		c.ps.mu.Unlock()
		require.True(t, reserved, "the Unlock reserved goroutine 2's waiter")
		if !reentering {
			close(lockHook.proceed)
			require.NoError(t, <-g2)
			require.NoError(t, h2.Unlock(ctx)) // goroutine 2: count 1
		}
		if lost {
			ucancel()
		}
		close(gate.proceed)
		if err := <-g1; !lost { // count 0, transferred in Redis
			require.NoError(t, err)
		}
		if reentering {
			close(lockHook.proceed)
			require.NoError(t, <-g2)
		}

		require.Eventually(t, func() bool {
			n, err := h1.HoldCount(ctx)
			return err == nil && n == 0
		}, 2*time.Second, 10*time.Millisecond, "each Lock was unlocked, yet the owner holds the lock: %v",
			rdb.HGetAll(ctx, h1.e.key).Val())
		select {
		case err := <-rlDone:
			require.NoError(t, err)
		case <-time.After(3 * time.Second):
			t.Fatal("the other owner still waits for the free lock")
		}
		require.NoError(t, rl.Unlock(ctx))
	})
}

// redlockWaiting starts a Redlock's Lock of name on c, a waiter of this
// Client that takes no transfers, and returns once it waits on channel.
func redlockWaiting(t *testing.T, ctx context.Context, c *Client, name, channel string) (*Redlock, chan error) {
	t.Helper()
	rl := NewRedlock(name, []*Client{c})
	done := make(chan error, 1)
	go func() { done <- rl.Lock(ctx) }()
	require.Eventually(t, func() bool {
		c.ps.mu.Lock()
		defer c.ps.mu.Unlock()
		ch := c.ps.chans[channel]
		return ch != nil && ch.isReady && len(ch.waiters) == 1
	}, 5*time.Second, time.Millisecond, "the Redlock never waited")
	return rl, done
}

// scriptGate, once armed, holds the next call of script before it is sent
// (closing held) until proceed is closed.
type scriptGate struct {
	passHook
	script  *redis.Script
	mu      sync.Mutex
	armed   bool
	held    chan struct{}
	proceed chan struct{}
	// after holds back the call's reply instead: the call runs in Redis
	// first (a slow link back).
	after bool
}

func (g *scriptGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if strings.ToLower(cmd.Name()) != "evalsha" || len(args) < 2 || args[1] != g.script.Hash() {
			return next(ctx, cmd)
		}
		g.mu.Lock()
		gate := g.armed
		g.armed = false
		g.mu.Unlock()
		if gate && g.after {
			err := next(ctx, cmd)
			close(g.held)
			<-g.proceed
			return err
		}
		if gate {
			close(g.held)
			<-g.proceed
		}
		return next(ctx, cmd)
	}
}

// TestReentryDuringFinalUnlockKeepsHoldGuarded: goroutine 1 holds a
// reentrant lock once through a handle and unlocks it; its release is on
// its way (slow), not yet run in Redis. Goroutine 2 locks through the same
// handle: Redis re-enters the hold (count 2, the same token or read hold),
// and the handle counts 2 holds on it. The release in flight cannot end
// that hold any more: goroutine 2 holds the lock, and the watchdog must
// keep renewing it, or close Lost at its deadline. It did neither (the
// hold stayed marked as ending with that release, count 1 against 1
// release in flight): the lease ran out in Redis, another owner took the
// lock, and goroutine 2's Lost stayed open.
func TestReentryDuringFinalUnlockKeepsHoldGuarded(t *testing.T) {
	const wdt = time.Second
	type kind struct {
		name   string
		script *redis.Script
		make   func(c *Client, name string) (lock, unlock func(context.Context) error, lost func() <-chan struct{}, other func(context.Context) (bool, error))
	}
	kinds := []kind{
		{"ReentrantMutex", unlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}, func(context.Context) (bool, error)) {
			m := c.ReentrantMutex(name)
			return m.Lock, m.Unlock, m.Lost, c.Mutex(name).TryLock
		}},
		{"FairMutex", fairUnlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}, func(context.Context) (bool, error)) {
			f := c.FairMutex(name)
			return f.Lock, f.Unlock, f.Lost, c.FairMutex(name).TryLock
		}},
		{"RWMutexWrite", rwUnlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}, func(context.Context) (bool, error)) {
			m := c.RWMutex(name)
			return m.Lock, m.Unlock, m.Lost, c.RWMutex(name).TryLock
		}},
		{"RWMutexRead", rwRUnlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, func() <-chan struct{}, func(context.Context) (bool, error)) {
			m := c.RWMutex(name)
			return m.RLock, m.RUnlock, m.RLost, c.RWMutex(name).TryLock
		}},
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 9*time.Second)
				defer cancel()
				rdb := b.Client(t)
				gate := &scriptGate{script: k.script, held: make(chan struct{}), proceed: make(chan struct{})}
				rdb.AddHook(gate)
				var once sync.Once
				open := func() { once.Do(func() { close(gate.proceed) }) }
				t.Cleanup(open) // before Close: the release goes on
				c := New(rdb, WithWatchdogTimeout(wdt))
				t.Cleanup(func() { _ = c.Close() })
				rel := make(chan error, 1)
				released := make(chan struct{})
				started := false
				t.Cleanup(func() {
					open()
					if started {
						<-released
					}
				})
				lock, unlock, lost, other := k.make(c, redistest.UniqueName(t))

				require.NoError(t, lock(ctx)) // goroutine 1: hold A, count 1
				gate.mu.Lock()
				gate.armed = true
				gate.mu.Unlock()
				started = true
				go func() { rel <- unlock(ctx); close(released) }() // goroutine 1's release, slow
				<-gate.held
				require.NoError(t, lock(ctx)) // goroutine 2 re-enters: count 2
				lostB := lost()
				require.NotNil(t, lostB)

				// The release stays on its way for longer than the lease.
				time.Sleep(wdt * 3 / 2)
				took, err := other(ctx)
				require.NoError(t, err)
				require.False(t, took && !isClosed(lostB),
					"another owner took the lock while goroutine 2 holds it and its Lost is open")

				open()
				<-rel
				if !took {
					require.False(t, isClosed(lostB), "goroutine 2's hold reported lost while held")
					require.NoError(t, unlock(ctx), "goroutine 2's hold is live")
				}
			})
		}
	})
}

// TestTryLockRacingRLockOfSameHandleReportsUpgrade: two goroutines share
// one RWMutex handle. One calls TryLock while the handle holds nothing, so
// its attempt says "no read hold of the owner is mine" (ARGV[7] "0", see
// cd94f2b); before that attempt reaches Redis, the other goroutine's RLock
// takes the read lock. The attempt then finds the owner holding the read
// lock and not the write lock: an upgrade, which TryLock reports as
// ErrUpgrade (as it did before cd94f2b). It returned (false, nil), which
// says another owner holds the lock: none does.
func TestTryLockRacingRLockOfSameHandleReportsUpgrade(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		rdb := b.Client(t)
		gate := &scriptGate{script: rwLockScript, held: make(chan struct{}), proceed: make(chan struct{})}
		rdb.AddHook(gate)
		var once sync.Once
		open := func() { once.Do(func() { close(gate.proceed) }) }
		t.Cleanup(open)
		c := New(rdb)
		t.Cleanup(func() { _ = c.Close() })
		name := redistest.UniqueName(t)
		m := c.RWMutex(name)

		gate.mu.Lock()
		gate.armed = true
		gate.mu.Unlock()
		type result struct {
			took bool
			err  error
		}
		res := make(chan result, 1)
		go func() {
			took, err := m.TryLock(ctx)
			res <- result{took, err}
		}()
		<-gate.held // the TryLock's attempt is built, not yet sent
		require.NoError(t, m.RLock(ctx), "no writer: the read lock is free")
		open()

		r := <-res
		require.False(t, r.took, "the owner reads: no write lock")
		require.True(t, errors.Is(r.err, ErrUpgrade),
			"TryLock by the owner holding only the read lock: want ErrUpgrade, got (%v, %v)", r.took, r.err)
		// No other owner holds anything.
		took, err := c.RWMutex(name).TryRLock(ctx)
		require.NoError(t, err)
		require.True(t, took)
		require.NoError(t, m.RUnlock(ctx))
	})
}
