package redlatch

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// mutexSleeping starts m.Lock(ctx) and returns its result's channel once
// its waiter (the only one of c on m's channel) takes transfers and has
// had time to make its second attempt and sleep.
func mutexSleeping(t *testing.T, ctx context.Context, c *Client, m *Mutex) chan error {
	t.Helper()
	got := make(chan error, 1)
	go func() { got <- m.Lock(ctx) }()
	require.Eventually(t, func() bool {
		c.ps.mu.Lock()
		defer c.ps.mu.Unlock()
		ch := c.ps.chans[m.e.channel]
		return ch != nil && ch.isReady && len(ch.waiters) == 1 && ch.waiters[0].xfer != nil
	}, 5*time.Second, time.Millisecond)
	time.Sleep(100 * time.Millisecond) // its second attempt failed: it sleeps
	return got
}

// heldWithSleeper loads the scripts, takes holder's lock, and starts
// waiter's Lock with a ctx of its own, asleep (see mutexSleeping): it
// returns the Lock's result and the cancel of its ctx (also run at the
// test's end).
func heldWithSleeper(t *testing.T, ctx context.Context, c *Client, holder, waiter *Mutex) (chan error, context.CancelFunc) {
	t.Helper()
	require.NoError(t, holder.Lock(ctx)) // loads the scripts
	require.NoError(t, holder.Unlock(ctx))
	require.NoError(t, holder.Lock(ctx))
	wctx, wcancel := context.WithCancel(ctx)
	t.Cleanup(wcancel)
	return mutexSleeping(t, wctx, c, waiter), wcancel
}

// TestTransferLostReplyToGoneWaiter: an Unlock hands the lock to the
// Client's only waiter (a local transfer), but the Unlock's reply is lost
// (its ctx ends while the reply is on the way), and the waiter's own ctx
// ends meanwhile. The transfer did happen in Redis: the waiter, gone, will
// never claim it, and the transferred hold is nobody's. The Unlock must
// give it back, as it does when the waiter leaves before a transfer whose
// reply came (deliver); it only woke the waiter, which was gone, and the
// lock stayed held for the waiter's whole lease (30 s), locking every
// other owner out.
func TestTransferLostReplyToGoneWaiter(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, hook, rdb := hookedClient(t, b, unlockScript, false)
		name := redistest.UniqueName(t)
		holder := c.Mutex(name)
		got, wcancel := heldWithSleeper(t, ctx, c, holder, c.Mutex(name))

		hook.arm()
		uctx, ucancel := context.WithCancel(ctx)
		defer ucancel()
		unlocked := make(chan error, 1)
		go func() { unlocked <- holder.Unlock(uctx) }()
		awaitRan(t, hook.ran) // transferred in Redis; the reply is held back
		require.Equal(t, "1", rdb.HGet(ctx, holder.e.key, "c").Val())
		require.NotEqual(t, holder.e.owner, rdb.HGet(ctx, holder.e.key, "o").Val(), "the lock was handed on")
		wcancel()
		require.Error(t, <-got, "the waiter gave up")
		ucancel()
		close(hook.proceed)
		t.Logf("Unlock: %v", <-unlocked)

		require.Eventually(t, func() bool {
			return rdb.Exists(ctx, holder.e.key).Val() == 0
		}, 2*time.Second, 10*time.Millisecond,
			"the hold transferred to a waiter that left stays held, by no one: %v (pttl %v)",
			rdb.HGetAll(ctx, holder.e.key).Val(), rdb.PTTL(ctx, holder.e.key).Val())
	})
}

// TestTransferLostReplyWaiterCancelledAfterWake: as above, but the waiter
// is still there when the failed Unlock wakes it to retry (its attempt
// would recognise the transferred hold as its own); its ctx ends before it
// sees the wake-up, and wait picks the ctx's end (at random, when both are
// ready). It must give back what may have been transferred to it, as it
// does a transfer it was told of; it left the transferred hold to run out
// its 30 s lease. Each round fails with probability 1/2 without the fix.
func TestTransferLostReplyWaiterCancelledAfterWake(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Name == "cluster" {
			t.Skip("one real backend is enough")
		}
		ctx, c, uhook, rdb := hookedClient(t, b, unlockScript, false)
		for round := range 8 {
			name := redistest.UniqueName(t)
			holder := c.Mutex(name)
			waiter := c.Mutex(name, WithOwner(redistest.UniqueName(t)))
			if round == 0 {
				require.NoError(t, holder.Lock(ctx)) // loads the scripts
				require.NoError(t, holder.Unlock(ctx))
			}
			require.NoError(t, holder.Lock(ctx))
			wctx, wcancel := context.WithCancel(ctx)
			got := mutexSleeping(t, wctx, c, waiter)

			// The waiter's next attempt fails (the holder holds) and its
			// reply is held back.
			gate := newOwnerGate(lockScript, waiter.e.owner, true)
			rdb.AddHook(gate)
			gate.arm()
			c.ps.wakeOne(holder.e.channel)
			<-gate.held

			// The Unlock transfers the lock to it; its reply is lost.
			uhook.mu.Lock()
			uhook.ran, uhook.proceed = make(chan struct{}), make(chan struct{})
			uhook.mu.Unlock()
			uhook.arm()
			uctx, ucancel := context.WithCancel(ctx)
			unlocked := make(chan error, 1)
			go func() { unlocked <- holder.Unlock(uctx) }()
			awaitRan(t, uhook.ran)
			require.Equal(t, waiter.e.owner, rdb.HGet(ctx, holder.e.key, "o").Val(), "transferred")
			ucancel()
			close(uhook.proceed)
			<-unlocked // woke the waiter to retry
			wcancel()
			close(gate.proceed) // the waiter's failed attempt returns: a wake-up and its ctx's end
			if err := <-got; err == nil {
				require.NoError(t, waiter.Unlock(ctx))
				continue
			}
			require.Eventually(t, func() bool {
				return rdb.Exists(ctx, holder.e.key).Val() == 0
			}, 2*time.Second, 10*time.Millisecond,
				"round %d: the hold transferred to a waiter that left stays held, by no one: %v (pttl %v)",
				round, rdb.HGetAll(ctx, holder.e.key).Val(), rdb.PTTL(ctx, holder.e.key).Val())
		}
	})
}

// TestLocalTransfersBoundedWithTwoWorkers: two goroutines of one Client
// take turns on a Mutex (each works 20 ms under the lock, 5 ms outside it,
// so each locks again while the other holds the lock), and a
// Lock of another Client waits. The README promises that after 8 local
// transfers in a row an Unlock releases publicly, so other Clients get their
// turn. But the count lived on the channel's local waiter list, which
// empties (the channel is dropped) each time the only waiter takes the
// lock: with two workers it never passed 1, every release was a transfer,
// nothing was published, and the other Client's waiter, failing each time
// its sleep (the 30 s lease a transfer restarts) ended, starved for as
// long as the two workers ran.
func TestLocalTransfersBoundedWithTwoWorkers(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Name == "cluster" {
			t.Skip("one real backend is enough")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		name := redistest.UniqueName(t)
		c1, c2 := New(b.Client(t)), New(b.Client(t))
		t.Cleanup(func() { _ = c1.Close(); _ = c2.Close() })

		stop := make(chan struct{})
		var workers sync.WaitGroup
		first := c1.Mutex(name)
		require.NoError(t, first.Lock(ctx))
		for i := range 2 {
			m := first
			if i == 1 {
				m = c1.Mutex(name)
			}
			workers.Add(1)
			go func() {
				defer workers.Done()
				for locked := i == 0; ; locked = false {
					if !locked {
						if err := m.Lock(ctx); err != nil {
							return
						}
					}
					time.Sleep(20 * time.Millisecond) // work
					_ = m.Unlock(ctx)
					select {
					case <-stop:
						return
					case <-time.After(5 * time.Millisecond): // work outside the lock
					}
				}
			}()
		}
		time.Sleep(100 * time.Millisecond) // the workers take turns

		other := c2.Mutex(name)
		octx, ocancel := context.WithTimeout(ctx, 3*time.Second)
		defer ocancel()
		start := time.Now()
		err := other.Lock(octx)
		waited := time.Since(start)
		close(stop)
		if err == nil {
			require.NoError(t, other.Unlock(ctx))
		}
		workers.Wait()
		require.NoError(t, err, "the other Client's waiter starved while two workers of one Client took turns")
		t.Logf("the other Client took the lock after %v", waited)
	})
}

// TestForceUnlockDuringTransferSparesWaitersOwnHold: a Mutex holder's
// Unlock hands the lock to a waiter of its Client (a local transfer); the
// transfer runs in Redis, its reply is late. Meanwhile an operator's
// ForceUnlock ends the transferred hold and publishes its wake-up, which
// wakes that very waiter (still registered): its attempt takes the free
// lock, a hold of its own, under the same acquisition request id. When the
// Unlock's reply came, the transfer the waiter did not use was given back by
// undoing that request id, which released the waiter's live hold (its Lock
// returned nil and its Lost stayed open, while the lock was free for
// anyone): in the Unlock ("after": the reply comes after the waiter left)
// and in the waiter's own cleanup ("before": the reply reaches the waiter
// while its attempt is on the way). A give-back now names the transferred
// hold's token. "lost reply": the Unlock, unsure whether it transferred,
// gives back only a hold of the owner with another token than the one the
// waiter left with. (Found by reviewers.)
func TestForceUnlockDuringTransferSparesWaitersOwnHold(t *testing.T) {
	for _, tc := range []struct {
		name   string
		before bool // the transfer reaches the waiter before its attempt is sent
		lost   bool // the Unlock's reply is lost: unsure, it gives back what it may have transferred
	}{{"after", false, false}, {"before", true, false}, {"lost reply", false, true}} {
		t.Run(tc.name, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, rdb := plainClient(t, b)
				name := redistest.UniqueName(t)
				holder, waiter := c.Mutex(name), c.Mutex(name)
				ugate := newOwnerGate(unlockScript, holder.e.owner, true)
				ugate.lose = tc.lost
				lgate := newOwnerGate(lockScript, waiter.e.owner, false)
				rdb.AddHook(ugate)
				rdb.AddHook(lgate)
				require.NoError(t, holder.Lock(ctx)) // loads the scripts
				require.NoError(t, holder.Unlock(ctx))

				require.NoError(t, holder.Lock(ctx))
				got := mutexSleeping(t, ctx, c, waiter)

				ugate.arm()
				uctx, ucancel := context.WithCancel(ctx)
				defer ucancel()
				unlocked := make(chan error, 1)
				go func() { unlocked <- holder.Unlock(uctx) }()
				<-ugate.held // the transfer ran in Redis; its reply is held

				if tc.before {
					lgate.arm()
				}
				_, other, _ := plainClient(t, b)
				ok, err := other.Mutex(name).ForceUnlock(ctx) // ends the transferred hold, wakes the waiter
				require.NoError(t, err)
				require.True(t, ok)
				if tc.before {
					select {
					case <-lgate.held: // the waiter's attempt, before it is sent
					case <-time.After(3 * time.Second):
						t.Fatal("the waiter was not woken by the ForceUnlock")
					}
					close(ugate.proceed)
					require.NoError(t, <-unlocked) // delivered to the waiter
					close(lgate.proceed)           // the attempt takes the free lock
					require.NoError(t, <-got)
				} else {
					select {
					case err := <-got: // the waiter took the free lock with an attempt
						require.NoError(t, err)
					case <-time.After(3 * time.Second):
						t.Fatal("the waiter was not woken by the ForceUnlock")
					}
					if tc.lost {
						ucancel()
						close(ugate.proceed)
						require.Error(t, <-unlocked) // unsure whether it transferred
					} else {
						close(ugate.proceed)
						require.NoError(t, <-unlocked) // its transfer did happen
					}
				}
				tok := waiter.Token()
				require.NotZero(t, tok)
				v, err := rdb.HGet(ctx, waiter.e.key, "t").Int64()
				require.NoError(t, err, "the waiter's hold was released under it (Lock returned nil, Lost open)")
				require.Equal(t, tok, v)
				select {
				case <-waiter.Lost():
					t.Fatal("Lost closed")
				default:
				}
				require.NoError(t, waiter.Unlock(ctx))
			})
		})
	}
}

var errLateTimeout = errors.New("i/o timeout (test: the request is still on its way)")

// newLateGate returns an ownerGate that, once armed, holds the next call of
// script by owner before it is sent (closing held); when fail is closed,
// its caller gets a timeout (the reply never comes) while the call is still
// on its way; when run is closed, the call reaches Redis and runs (closing
// ran): a request stuck in a slow link, which Redis runs after its client
// gave up on it.
func newLateGate(script *redis.Script, owner string) *ownerGate {
	g := newOwnerGate(script, owner, false)
	g.fail, g.run, g.ran = make(chan struct{}), make(chan struct{}), make(chan struct{})
	return g
}

// TestLateTransferAfterGiveBack: an Unlock hands the lock to a waiter of
// its Client (a local transfer), but its script is stuck on the way (a
// slow link): the Unlock times out, unsure whether it transferred. The
// give-back of what may have been transferred runs (it finds nothing yet,
// and leaves the waiter's tombstone), then the stuck script reaches Redis
// and hands the lock to the waiter's acquisition, which is over. Nobody
// tracks, renews or releases that hold: every other owner waits for the
// waiter's whole lease (30 s). A late lock attempt after its undo takes
// nothing (the tombstone, see TestLateAcquisitionAfterUndo); a late
// transfer, which is an acquisition too, took the lock.
//
//   - "unlock gives back": the waiter left (ctx ended) before the Unlock
//     timed out; the Unlock's unsure branch undoes the acquisition.
//   - "waiter gives back": the waiter was still waiting; unsure marked it,
//     and its cleanup undoes the acquisition when its ctx ends.
//
// A transfer now honours the waiter's tombstone, and a give-back that
// finds nothing to give back still leaves one. (Found by a reviewer.)
func TestLateTransferAfterGiveBack(t *testing.T) {
	for _, waiterFirst := range []bool{true, false} {
		t.Run(map[bool]string{true: "unlock gives back", false: "waiter gives back"}[waiterFirst], func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, rdb := plainClient(t, b)
				name := redistest.UniqueName(t)
				holder := c.Mutex(name)
				gate := newLateGate(unlockScript, holder.e.owner)
				rdb.AddHook(gate)
				got, wcancel := heldWithSleeper(t, ctx, c, holder, c.Mutex(name))

				gate.arm()
				unlocked := make(chan error, 1)
				go func() { unlocked <- holder.Unlock(ctx) }()
				<-gate.held // the waiter is reserved; the transfer is on its way
				if waiterFirst {
					wcancel()
					require.Error(t, <-got)
					close(gate.fail)
					require.Error(t, <-unlocked) // unsure: it gives back what may have been transferred
				} else {
					close(gate.fail)
					require.Error(t, <-unlocked)      // unsure: the waiter is marked
					time.Sleep(50 * time.Millisecond) // woken, its attempt fails: the holder still holds
					wcancel()
					require.Error(t, <-got) // it gives back what may have been transferred
				}
				close(gate.run)
				awaitRan(t, gate.ran) // the stuck script runs now
				t.Logf("after the late script: %v (pttl %v)", rdb.HGetAll(ctx, holder.e.key).Val(),
					rdb.PTTL(ctx, holder.e.key).Val())

				_, other, _ := plainClient(t, b)
				requireTakenSoon(t, ctx, other.Mutex(name), rdb)
			})
		})
	}
}

// TestLateTransferToWaiterThatReentered: TestTransferToWaiterThatReentered
// (its still-reentering case too) with the Unlock's script
// stuck on the way instead of its reply lost. The waiter (a Lock sharing
// the owner) left with the hold it re-entered; the give-back of the
// unsure Unlock (in the Unlock: "left before", or in the waiter's cleanup:
// "left after") reads the owner's hold, finds the waiter's own token and
// does nothing. Then the script runs: it ends the hold and hands the lock to
// the waiter's acquisition, which is over. The owner holds the lock, tracked
// by no one, for a whole lease; the other owner (a Redlock) waits.
func TestLateTransferToWaiterThatReentered(t *testing.T) {
	for _, leftBefore := range []bool{true, false} {
		t.Run(map[bool]string{true: "left before", false: "left after"}[leftBefore], func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, rdb := plainClient(t, b)
				name := redistest.UniqueName(t)
				h1 := c.ReentrantMutex(name, WithOwner("shared-owner"))
				h2 := c.ReentrantMutex(name, WithOwner("shared-owner"))
				lockHook := newOwnerGate(lockScript, h1.e.owner, true)
				gate := newLateGate(unlockScript, h1.e.owner)
				rdb.AddHook(lockHook)
				rdb.AddHook(gate)
				require.NoError(t, h1.Lock(ctx)) // loads the scripts
				require.NoError(t, h1.Unlock(ctx))

				require.NoError(t, h1.Lock(ctx))
				rl, rlDone := redlockWaiting(t, ctx, c, name, h1.e.channel)

				lockHook.arm()
				g2 := make(chan error, 1)
				go func() { g2 <- h2.Lock(ctx) }() // joins, then re-enters
				<-lockHook.held                    // count 2; the reply is on its way
				require.NoError(t, h1.Unlock(ctx)) // count 1

				gate.arm()
				g1 := make(chan error, 1)
				go func() { g1 <- h1.Unlock(ctx) }() // reserves h2's waiter
				<-gate.held
				c.ps.mu.Lock()
				reserved := slices.ContainsFunc(c.ps.chans[h1.e.channel].waiters, func(w *waiter) bool { return w.reserved })
				c.ps.mu.Unlock()
				require.True(t, reserved, "the Unlock reserved h2's waiter")
				if leftBefore {
					close(lockHook.proceed)
					require.NoError(t, <-g2) // left with the re-entered hold
					close(gate.fail)
					require.Error(t, <-g1) // unsure; the owner's hold has the waiter's token
				} else {
					close(gate.fail)
					require.Error(t, <-g1) // unsure: the waiter is marked
					close(lockHook.proceed)
					require.NoError(t, <-g2) // its cleanup finds the owner's hold has its token
				}
				close(gate.run)
				awaitRan(t, gate.ran) // the stuck script runs: count 0, handed to h2's acquisition
				t.Logf("after the late script: %v (pttl %v)", rdb.HGetAll(ctx, h1.e.key).Val(),
					rdb.PTTL(ctx, h1.e.key).Val())

				require.Eventually(t, func() bool {
					n, err := h1.HoldCount(ctx)
					return err == nil && n == 0
				}, 2*time.Second, 10*time.Millisecond, "two Locks, two Unlocks, yet the owner holds the lock: %v (pttl %v)",
					rdb.HGetAll(ctx, h1.e.key).Val(), rdb.PTTL(ctx, h1.e.key).Val())
				select {
				case err := <-rlDone:
					require.NoError(t, err)
					require.NoError(t, rl.Unlock(ctx))
				case <-time.After(100 * time.Millisecond):
					// The lock is free; the Redlock sleeps to its bound (the
					// late release published nothing): not this test's point.
				}
			})
		})
	}
}

// TestLateTransferThroughSlowLink: TestLateTransferAfterGiveBack "unlock
// gives back" without hooks: the Client's link to Redis (a proxy) holds the
// Unlock's script until its ctx's deadline has passed; go-redis (no
// retries) times out, the Unlock, unsure, undoes the waiter's acquisition
// on a new connection, and then the proxy lets the script through.
func TestLateTransferThroughSlowLink(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		if b.Server == nil {
			t.Skip("needs a single real redis-server behind a proxy")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		proxy := redistest.NewProxy(t, b.Server.Addr)
		opts := b.Server.Options()
		opts.Addr, opts.PoolSize, opts.MaxRetries = proxy.Addr, 1, -1
		rdb := redis.NewClient(opts)
		t.Cleanup(func() { _ = rdb.Close() })
		c := New(rdb)
		t.Cleanup(func() { _ = c.Close() })
		admin := b.Client(t)

		name := redistest.UniqueName(t)
		holder := c.Mutex(name)
		got, wcancel := heldWithSleeper(t, ctx, c, holder, c.Mutex(name))

		require.Positive(t, proxy.Hold())
		uctx, ucancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer ucancel()
		unlocked := make(chan error, 1)
		go func() { unlocked <- holder.Unlock(uctx) }()
		require.Eventually(t, func() bool {
			c.ps.mu.Lock()
			defer c.ps.mu.Unlock()
			ch := c.ps.chans[holder.e.channel]
			return ch != nil && len(ch.waiters) == 1 && ch.waiters[0].reserved
		}, time.Second, time.Millisecond, "the Unlock reserved the waiter")
		wcancel()
		require.Error(t, <-got)
		require.Error(t, <-unlocked) // timed out; it undid the waiter's acquisition
		proxy.Release()              // the script reaches Redis now
		time.Sleep(100 * time.Millisecond)

		oc := New(admin)
		t.Cleanup(func() { _ = oc.Close() })
		requireTakenSoon(t, ctx, oc.Mutex(name), admin)
	})
}

// TestRefusedTransferWakesNoOne: an Unlock reserves a waiter of its Client
// for a local transfer while that waiter's attempt is failing (a network
// error, or its ctx's deadline mid-call): the waiter undoes its acquisition
// (leaving its tombstone) and leaves, and the Unlock's transfer script,
// sent just after, finds the tombstone and releases the lock instead
// (8709125). Its reply reaches the Unlock, which returns nil, but nobody
// announces the release: no publish (a transfer names no channel) and no
// local wake-up (unreserve of a waiter that left wakes no one). A waiter of
// another Client, whose attempt set w during the hold, sleeps to its lease
// bound (30 s) while the lock is free. Before 8709125 the transfer went to
// the waiter, deliver found it gone, and the give-back published. The
// Unlock now publishes the release itself. (Found by a reviewer.)
func TestRefusedTransferWakesNoOne(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, rdb := plainClient(t, b)
		_, c2, _ := plainClient(t, b)
		name := redistest.UniqueName(t)
		holder := c.Mutex(name)
		require.NoError(t, holder.Lock(ctx)) // loads the scripts
		require.NoError(t, holder.Unlock(ctx))
		require.NoError(t, holder.Lock(ctx))

		waiter := c.Mutex(name)
		got := mutexSleeping(t, ctx, c, waiter)
		other := c2.Mutex(name)
		otherDone := make(chan error, 1)
		go func() { otherDone <- other.Lock(ctx) }()
		require.Eventually(t, func() bool {
			c2.ps.mu.Lock()
			defer c2.ps.mu.Unlock()
			ch := c2.ps.chans[other.e.channel]
			return ch != nil && ch.isReady && len(ch.waiters) == 1
		}, 5*time.Second, time.Millisecond)
		time.Sleep(100 * time.Millisecond) // its second attempt failed: it sleeps to the lease bound

		ug := newOwnerGate(unlockScript, holder.e.owner, false)
		fg := newOwnerGate(lockScript, waiter.e.owner, false)
		fg.drop = true
		rdb.AddHook(ug)
		rdb.AddHook(fg)
		ug.arm()
		fg.arm()
		unlocked := make(chan error, 1)
		go func() { unlocked <- holder.Unlock(ctx) }()
		<-ug.held // the waiter is reserved; the transfer is about to be sent

		c.ps.wakeOne(holder.e.channel) // the waiter attempts: the attempt fails, it undoes and leaves
		<-fg.held
		require.Error(t, <-got)
		close(ug.proceed) // the transfer runs after the undo
		require.NoError(t, <-unlocked)
		t.Logf("after the transfer: %v", rdb.HGetAll(ctx, holder.e.key).Val())

		select {
		case err := <-otherDone:
			require.NoError(t, err)
			require.NoError(t, other.Unlock(ctx))
		case <-time.After(2 * time.Second):
			free := rdb.Exists(ctx, holder.e.key).Val() == 0
			t.Fatalf("the lock is free (%v) but the other Client's waiter sleeps to its lease bound: "+
				"the refused transfer's release was announced to no one", free)
		}
	})
}

// requireTakenSoon requires m (another owner's Mutex) to take the lock
// within 2 s, and releases it: the lock is not held by nobody for a lease.
func requireTakenSoon(t *testing.T, ctx context.Context, m *Mutex, rdb redis.UniversalClient) {
	t.Helper()
	requireTakesSoon(t, ctx, m, 2*time.Second,
		"the lock went to a waiter that had given up, and is held by no one: %v (pttl %v)",
		rdb.HGetAll(ctx, m.e.key).Val(), rdb.PTTL(ctx, m.e.key).Val())
}

// TestNoTransferToShorterLease: a hold of 30s (the watchdog's lease) or, in
// the shared-owner case, of 10s (o1's: the hold o1 and o2 share keeps the
// longer lease left, as re-entries never shorten it) is released while
// bm, of another Client, sleeps on its remaining lease. The Unlock handed
// the lock to a2, a waiter of the releasing Client with WithLease(300ms),
// which never unlocks (its work overran, or it crashed): a transfer
// publishes nothing, and the lock was free 300ms later while bm slept on.
// A waiter whose lease is shorter than the hold's remaining lease gets no
// transfer: the lock is released publicly. (Found by reviewers: first with
// a2's lease shorter than the releasing handle's, then with the lease left
// by another handle of the owner, which unlock.lua checks.)
func TestNoTransferToShorterLease(t *testing.T) {
	for _, shared := range []bool{false, true} {
		t.Run(map[bool]string{false: "shorter", true: "shared owner"}[shared], func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
				t.Cleanup(cancel)
				name := redistest.UniqueName(t)
				ca, cb := New(b.Client(t)), New(b.Client(t))
				t.Cleanup(func() { _ = ca.Close(); _ = cb.Close() })
				a2, bm := ca.Mutex(name, WithLease(300*time.Millisecond)), cb.Mutex(name)
				a1 := ca.ReentrantMutex(name)
				o2 := ca.ReentrantMutex(name, WithOwner("o"), WithLease(300*time.Millisecond))
				if shared {
					a1 = ca.ReentrantMutex(name, WithOwner("o"), WithLease(10*time.Second))
				}
				require.NoError(t, a1.Lock(ctx))
				bGot := make(chan error, 1)
				go func() { bGot <- bm.Lock(ctx) }()
				aGot := mutexSleeping(t, ctx, ca, a2) // bm sleeps too by then
				if shared {
					require.NoError(t, o2.Lock(ctx)) // a re-entry: the hold keeps its 10s
				}
				require.NoError(t, a1.Unlock(ctx))
				if shared {
					require.NoError(t, o2.Unlock(ctx)) // the hold's last release
				}
				select {
				case err := <-bGot:
					require.NoError(t, err)
				case <-time.After(3 * time.Second):
					t.Fatal("bm sleeps on after a2's lease ran out")
				}
				require.NoError(t, bm.Unlock(ctx))
				require.NoError(t, <-aGot)
				<-a2.Lost()
				require.ErrorIs(t, a2.Unlock(ctx), ErrNotHeld)
			})
		})
	}
}
