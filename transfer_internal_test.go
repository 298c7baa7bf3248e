package redlatch

import (
	"context"
	"sync"
	"testing"
	"time"

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
		require.NoError(t, holder.Lock(ctx)) // loads the scripts
		require.NoError(t, holder.Unlock(ctx))
		require.NoError(t, holder.Lock(ctx))

		wctx, wcancel := context.WithCancel(ctx)
		defer wcancel()
		got := mutexSleeping(t, wctx, c, c.Mutex(name))

		hook.arm()
		uctx, ucancel := context.WithCancel(ctx)
		defer ucancel()
		unlocked := make(chan error, 1)
		go func() { unlocked <- holder.Unlock(uctx) }()
		<-hook.ran // transferred in Redis; the reply is held back
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
			<-uhook.ran
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
