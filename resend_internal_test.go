package redlatch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// passHook passes every call on: the go-redis hooks of the tests embed it
// and define only the methods they act on.
type passHook struct{}

func (passHook) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (passHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (passHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// replyHook, once armed, lets the next call of script run in Redis, then
// waits until proceed is closed (others run meanwhile) and answers the
// caller as a lost reply does: with resend set, go-redis sends the same
// command again (MaxRetries), whose reply the caller gets; else the call
// fails with its context's error, which the test has cancelled meanwhile
// (the caller gave up while its attempt was on the way, and undoes it).
type replyHook struct {
	passHook
	script *redis.Script
	resend bool
	// lostErr, when set, is the error the lost reply's call returns
	// (default: its ctx's).
	lostErr error
	// only, when set, picks the call whose reply is lost: a call of script
	// it refuses after its run gets its reply, and the hook stays armed.
	only    func(cmd redis.Cmder) bool
	mu      sync.Mutex
	armed   bool
	ran     chan struct{}
	proceed chan struct{}
}

func newReplyHook(script *redis.Script, resend bool) *replyHook {
	return &replyHook{script: script, resend: resend, ran: make(chan struct{}), proceed: make(chan struct{})}
}

// hookedClient returns a context bounded for the test, a Client on b
// whose calls of script go through a replyHook, that hook, and the go-redis
// client.
func hookedClient(t *testing.T, b redistest.Backend, script *redis.Script, resend bool) (context.Context, *Client, *replyHook, redis.UniversalClient) {
	t.Helper()
	ctx, c, rdb := plainClient(t, b)
	hook := newReplyHook(script, resend)
	rdb.AddHook(hook)
	return ctx, c, hook, rdb
}

// plainClient returns a 20s context, a Client on a Redis client of b of its
// own, and that Redis client, for the test's hooks (AddHook).
func plainClient(t *testing.T, b redistest.Backend) (context.Context, *Client, redis.UniversalClient) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	rdb := b.Client(t)
	c := New(rdb)
	t.Cleanup(func() { _ = c.Close() })
	return ctx, c, rdb
}

// awaitRan waits for a hook's ran channel to close, failing the test after
// 10s: a test whose gated call took another way fails instead of hanging.
func awaitRan(t *testing.T, ran <-chan struct{}) {
	t.Helper()
	select {
	case <-ran:
	case <-time.After(10 * time.Second):
		t.Fatal("the gated call did not run")
	}
}

func (h *replyHook) arm() {
	h.mu.Lock()
	h.armed = true
	h.mu.Unlock()
}

func (h *replyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if name := strings.ToLower(cmd.Name()); name == "evalsha" {
			if s, _ := cmd.Args()[1].(string); s == h.script.Hash() {
				h.mu.Lock()
				gate := h.armed
				h.armed = false
				h.mu.Unlock()
				if gate {
					err := next(context.WithoutCancel(ctx), cmd) // it runs; its reply is lost
					if h.only != nil && !h.only(cmd) {
						h.arm()
						return err
					}
					close(h.ran)
					<-h.proceed
					if h.resend {
						return next(ctx, cmd)
					}
					err = ctx.Err()
					if h.lostErr != nil {
						err = h.lostErr
					}
					cmd.SetErr(err)
					return err
				}
			}
		}
		return next(ctx, cmd)
	}
}

// kindHandle is a handle of one of the reentrant kinds below.
type kindHandle struct {
	lock, unlock func(context.Context) error
	lost         func() <-chan struct{}
	key          string
	// excluded reports, with a write attempt of another owner's (a
	// TryLock), whether the lock keeps it out; it releases what it took.
	excluded func(context.Context) (bool, error)
	// force is the handle's ForceUnlock, an operator's: it ends every hold.
	force func(context.Context) (bool, error)
}

// reentrantKinds are the reentrant holds of one owner, with the scripts
// that take and release them.
var reentrantKinds = []struct {
	kind         string
	lock, unlock **redis.Script
	make         func(c *Client, name string, opts ...LockOption) kindHandle
}{
	{"ReentrantMutex", &lockScript, &unlockScript, func(c *Client, name string, opts ...LockOption) kindHandle {
		m := c.ReentrantMutex(name, opts...)
		return kindHandle{m.Lock, m.Unlock, m.Lost, m.e.key, excludedBy(m.TryLock, m.Unlock), m.ForceUnlock}
	}},
	{"FairMutex", &fairLockScript, &fairUnlockScript, func(c *Client, name string, opts ...LockOption) kindHandle {
		m := c.FairMutex(name, opts...)
		return kindHandle{m.Lock, m.Unlock, m.Lost, m.key, excludedBy(m.TryLock, m.Unlock), m.ForceUnlock}
	}},
	{"RWMutex", &rwLockScript, &rwUnlockScript, func(c *Client, name string, opts ...LockOption) kindHandle {
		m := c.RWMutex(name, opts...)
		return kindHandle{m.Lock, m.Unlock, m.Lost, m.key, excludedBy(m.TryLock, m.Unlock), m.ForceUnlock}
	}},
	{"RWMutexRead", &rwRLockScript, &rwRUnlockScript, func(c *Client, name string, opts ...LockOption) kindHandle {
		m := c.RWMutex(name, opts...)
		return kindHandle{m.RLock, m.RUnlock, m.RLost, m.key, excludedBy(m.TryLock, m.Unlock), m.ForceUnlock}
	}},
}

func excludedBy(try func(context.Context) (bool, error), unlock func(context.Context) error) func(context.Context) (bool, error) {
	return func(ctx context.Context) (bool, error) {
		ok, err := try(ctx)
		if ok {
			_ = unlock(ctx)
		}
		return !ok, err
	}
}

// requireExcluded fails the test when another owner, on another Client, can
// take the lock of kind k named name.
func requireExcluded(t *testing.T, ctx context.Context, b redistest.Backend, k int, name, msg string) {
	t.Helper()
	w := New(b.Client(t))
	t.Cleanup(func() { _ = w.Close() })
	excluded, err := reentrantKinds[k].make(w, name).excluded(ctx)
	require.NoError(t, err)
	require.True(t, excluded, msg)
}

// TestPartialUnlockResentAfterInterleave: three goroutines share a handle,
// each holding the lock once (count 3). One Unlock's reply is lost and
// go-redis resends it; meanwhile another goroutine's Unlock ran. The resend
// is recognised (the hold remembers its last few partial releases, not only
// the latest): the count is 1, not 0, and no writer gets in while the third
// goroutine holds. (Found by a reviewer on RWMutex.)
func TestPartialUnlockResentAfterInterleave(t *testing.T) {
	for ki, k := range reentrantKinds {
		t.Run(k.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, hook, _ := hookedClient(t, b, *k.unlock, true)
				name := redistest.UniqueName(t)
				h := k.make(c, name)
				require.NoError(t, h.lock(ctx)) // loads the scripts
				require.NoError(t, h.unlock(ctx))
				for i := 0; i < 3; i++ {
					require.NoError(t, h.lock(ctx))
				}
				hook.arm()
				done := make(chan error, 1)
				go func() { done <- h.unlock(ctx) }() // goroutine 1
				awaitRan(t, hook.ran)
				require.NoError(t, h.unlock(ctx)) // goroutine 2
				close(hook.proceed)
				require.NoError(t, <-done)
				requireExcluded(t, ctx, b, ki, name, "another owner got in while the third goroutine holds")
				require.NoError(t, h.unlock(ctx)) // goroutine 3
			})
		})
	}
}

// TestUndoAfterConcurrentReentry: two goroutines share a handle. One Lock
// gives up (ctx) while its attempt is on the way; the attempt took (or
// re-entered) the hold, but its reply is lost. Before its undo runs, the
// other goroutine:
//   - "one": re-enters the hold once. The undo recognises its acquisition
//     among the hold's last few (not only the latest) and takes it back.
//     (Found by a reviewer on RWMutex; it leaked a hold until its lease ran
//     out.)
//   - "many": locks and unlocks 9 times in a row, never more than two calls
//     in flight. Had those completed acquisitions stayed in the hold's list
//     of its last 8 (lua/ids.lua), they would have pushed the lost one out
//     and its undo would have found nothing to undo. A release names one of
//     the handle's acquisitions whose reply came, and a partial release
//     drops it from the list (q, wq or rq:<owner>). (Found by a reviewer
//     chasing a miniredis-only stress failure: an undo there often reached
//     Redis ~10ms after its attempt ran.)
//   - "reentry": as "many", with the other goroutine holding the lock
//     throughout, so that the lost acquisition is a re-entry.
//
// Either way, after every Lock that succeeded is released, nothing is held.
func TestUndoAfterConcurrentReentry(t *testing.T) {
	const idsKept = 8 // lua/ids.lua
	for _, k := range reentrantKinds {
		for _, mode := range []string{"one", "many", "reentry"} {
			many := mode != "one"
			t.Run(k.kind+"/"+mode, func(t *testing.T) {
				redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
					ctx, c, hook, rdb := hookedClient(t, b, *k.lock, false)
					name := redistest.UniqueName(t)
					h := k.make(c, name)
					require.NoError(t, h.lock(ctx)) // loads the scripts
					require.NoError(t, h.unlock(ctx))

					if mode == "reentry" {
						// The lost acquisition is a re-entry, which a
						// FairMutex does not remember apart (as its grant)
						// the way it does one that took the free lock.
						// (Found by a reviewer.)
						require.NoError(t, h.lock(ctx)) // goroutine 2 holds
					}
					hook.arm()
					gctx, gcancel := context.WithCancel(ctx)
					done := make(chan error, 1)
					go func() { done <- h.lock(gctx) }() // goroutine 1
					awaitRan(t, hook.ran)
					if many { // goroutine 2
						for i := 0; i <= idsKept; i++ {
							require.NoError(t, h.lock(ctx))
							require.NoError(t, h.unlock(ctx))
						}
					} else {
						require.NoError(t, h.lock(ctx))
					}
					gcancel()
					close(hook.proceed)
					require.ErrorIs(t, <-done, ErrNotObtained)
					if mode != "many" {
						require.NoError(t, h.unlock(ctx)) // goroutine 2 is done too
					}
					n, err := rdb.Exists(ctx, h.key).Result()
					require.NoError(t, err)
					require.Zero(t, n, "every Lock that succeeded was released, yet the owner still holds: %v",
						rdb.HGetAll(ctx, h.key).Val())
				})
			})
		}
	}
}

// TestUnlockResentAfterRelock: handles a and b share the owner id "svc";
// b, which tracks no hold, releases the hold a took: fully, or partly (a
// holds it twice, and a then releases the rest). Its reply is lost and
// go-redis resends it; meanwhile a took the lock again. The resend must
// not release a's new hold, which would let another owner in while a holds
// the lock: a release that names no hold first reads the owner's current
// one and names it, so the resend finds another hold. (Found by reviewers:
// on RWMutex first, then on the exclusive locks; the fence key's last full
// release, checked first, covered neither the partial case nor a full one
// with another owner's release between: see
// TestFullUnlockResentAfterOtherOwnerCycle.)
func TestUnlockResentAfterRelock(t *testing.T) {
	// free: no one holds the lock when b releases; its first run releases
	// nothing, and its resend must not release the hold a took meanwhile:
	// the owner's hold read first is none, and the release names no hold
	// (it named any hold of the owner; found by a reviewer).
	for ki, k := range reentrantKinds {
		for _, mode := range []string{"full", "partial", "free"} {
			t.Run(k.kind+"/"+mode, func(t *testing.T) {
				redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
					ctx, c, hook, _ := hookedClient(t, b, *k.unlock, true)
					name := redistest.UniqueName(t)
					a := k.make(c, name, WithOwner("svc"))
					bh := k.make(c, name, WithOwner("svc"))
					require.NoError(t, a.lock(ctx)) // loads the scripts
					require.NoError(t, a.unlock(ctx))

					if mode != "free" {
						require.NoError(t, a.lock(ctx))
					}
					if mode == "partial" {
						require.NoError(t, a.lock(ctx)) // count 2
					}
					hook.arm()
					done := make(chan error, 1)
					go func() { done <- bh.unlock(ctx) }() // count 0 (or 1)
					awaitRan(t, hook.ran)
					if mode == "partial" {
						require.NoError(t, a.unlock(ctx)) // count 0: released
					}
					require.NoError(t, a.lock(ctx)) // a new hold of "svc"
					close(hook.proceed)
					if err := <-done; err != nil || mode == "free" {
						// The resend names a hold that is gone: a wrong
						// ErrNotHeld is the safe answer, not a release.
						require.ErrorIs(t, err, ErrNotHeld)
					}
					select {
					case <-a.lost():
						t.Fatal("Lost of a's new hold closed")
					default:
					}
					requireExcluded(t, ctx, b, ki, name, "another owner got in while a holds the lock")
					require.NoError(t, a.unlock(ctx))
				})
			})
		}
	}
}

// TestTransferClaimedLateKeepsRedisExpiry: a Mutex Unlock hands the lock to
// a waiter of its Client (a transfer: the waiter's lease from the script's
// run), and the reply is lost for 500 ms. Either way the waiter's local
// deadline must not pass Redis's expiry:
//   - resent: go-redis sends the call again, which finds the hold its
//     waiter's (q holds the waiter's request id) and reports its token
//     again; the waiter tracks it from the first send;
//   - failed: the Unlock gives up (its context ends), and the waiter
//     retries its attempt, which lock.lua recognises. The waiter tracks the
//     hold from its retry's send time, so lock.lua restarts the lease then
//     too (never shortening it); it did not, and the local deadline was
//     ~500 ms later than Redis's expiry: another owner took the lock while
//     the waiter's Lost was open. (Found by a reviewer.)
func TestTransferClaimedLateKeepsRedisExpiry(t *testing.T) {
	redistest.Together(t, func(run func(string, func(*testing.T))) {
		for _, resend := range []bool{true, false} {
			run(map[bool]string{true: "resent", false: "failed"}[resend], func(t *testing.T) {
				testTransferReplyLost(t, resend)
			})
		}
	})
}

func testTransferReplyLost(t *testing.T, resend bool) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, hook, rdb := hookedClient(t, b, unlockScript, resend)
		name := redistest.UniqueName(t)
		a := c.Mutex(name, WithLease(time.Second)) // no longer than bm's: a transfer (see reserveLocal)
		bm := c.Mutex(name, WithLease(time.Second))
		require.NoError(t, a.Lock(ctx)) // loads the scripts
		require.NoError(t, a.Unlock(ctx))

		require.NoError(t, a.Lock(ctx))
		got := make(chan error, 1)
		go func() { got <- bm.Lock(ctx) }()
		require.Eventually(t, func() bool {
			_, waiting := c.ps.reserveLocal(a.e.channel, false, 0)
			return waiting
		}, 5*time.Second, time.Millisecond)
		time.Sleep(50 * time.Millisecond) // b sleeps
		hook.arm()
		uctx, ucancel := context.WithCancel(ctx)
		defer ucancel()
		go func() {
			awaitRan(t, hook.ran)
			time.Sleep(500 * time.Millisecond)
			if !resend {
				ucancel()
			}
			close(hook.proceed)
		}()
		err := a.Unlock(uctx)
		if resend {
			require.NoError(t, err)
		} else {
			require.ErrorIs(t, err, context.Canceled)
		}
		require.NoError(t, <-got)
		held, err := rdb.HGet(ctx, bm.e.key, "t").Int64()
		require.NoError(t, err)
		require.Equal(t, held, bm.Token())

		pttl, err := rdb.PTTL(ctx, bm.e.key).Result()
		require.NoError(t, err)
		local := time.Until(c.wd.deadlineOf(bm.h))
		t.Logf("Redis PTTL %v, local deadline in %v", pttl, local)

		time.Sleep(pttl + 20*time.Millisecond) // Redis expired the hold
		w := New(b.Client(t))
		t.Cleanup(func() { _ = w.Close() })
		other := w.Mutex(name)
		ok, err := other.TryLock(ctx)
		require.NoError(t, err)
		if ok {
			defer func() { _ = other.Unlock(ctx) }()
		}
		select {
		case <-bm.Lost():
		default:
			require.False(t, ok, "another owner holds the lock while b's Lost is open (local deadline %v after Redis's)", local-pttl)
		}
	})
}

// TestFullUnlockResentAfterOtherOwnerCycle: TestUnlockResentAfterRelock
// with another owner's hold between: b's tokenless full release is resent
// after another owner took and released the lock (the fence key's last
// release is now that owner's) and a took it again. The resend, naming
// the hold it meant (see TestUnlockResentAfterRelock), leaves a's new
// hold alone. (Found by a reviewer.)
func TestFullUnlockResentAfterOtherOwnerCycle(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		rdb := b.Client(t)
		hook := newReplyHook(unlockScript, true)
		rdb.AddHook(hook)
		c := New(rdb)
		t.Cleanup(func() { _ = c.Close() })
		w := New(b.Client(t))
		t.Cleanup(func() { _ = w.Close() })
		name := redistest.UniqueName(t)
		a := c.ReentrantMutex(name, WithOwner("svc"))
		bh := c.ReentrantMutex(name, WithOwner("svc"))
		other := w.ReentrantMutex(name)
		require.NoError(t, a.Lock(ctx)) // loads the scripts
		require.NoError(t, a.Unlock(ctx))

		require.NoError(t, a.Lock(ctx))
		hook.arm()
		done := make(chan error, 1)
		go func() { done <- bh.Unlock(ctx) }() // releases a's hold
		awaitRan(t, hook.ran)
		_ = a.Unlock(ctx) // ErrNotHeld: b released a's hold
		require.NoError(t, other.Lock(ctx))
		require.NoError(t, other.Unlock(ctx))
		require.NoError(t, a.Lock(ctx)) // a new hold of "svc"
		close(hook.proceed)
		_ = <-done

		ok, err := other.TryLock(ctx)
		require.NoError(t, err)
		if ok {
			_ = other.Unlock(ctx)
		}
		require.False(t, ok, "another owner got in while a holds the lock")
		require.NoError(t, a.Unlock(ctx))
	})
}

// TestPartialUnlockResentAfterFinalUnlock: two goroutines share a handle
// of a reentrant kind, each holding it once. Goroutine 1's Unlock (a
// partial release: count 1) runs, its reply is lost and go-redis resends it;
// meanwhile goroutine 2's Unlock released the lock. The resend finds no
// hold: it must be recognised as the partial release that ran (both
// Unlocks succeeded), not reported as ErrNotHeld, which says the hold was
// not held or lost. Before the fix the hold's partial releases (field u,
// wu or ru:<owner>) went with the hold, and the fence key (or the rr field
// of an RWMutex) remembered only the final release's request id. (Found by
// a reviewer on ReentrantMutex; FairMutex and both sides of RWMutex had
// the same gap.)
func TestPartialUnlockResentAfterFinalUnlock(t *testing.T) {
	for _, k := range reentrantKinds {
		kepts := []bool{false}
		if strings.HasPrefix(k.kind, "RWMutex") {
			// Only an RWMutex's hash outlives a full release (other holds
			// in it): the release is then remembered in the hash.
			kepts = append(kepts, true)
		}
		for _, kept := range kepts {
			t.Run(fmt.Sprintf("%s/hashKept=%v", k.kind, kept), func(t *testing.T) {
				redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
					ctx, c, hook, rdb := hookedClient(t, b, *k.unlock, true)
					name := redistest.UniqueName(t)
					h := k.make(c, name, WithOwner("svc"))
					require.NoError(t, h.lock(ctx)) // loads the scripts
					require.NoError(t, h.unlock(ctx))

					require.NoError(t, h.lock(ctx)) // goroutine 1
					require.NoError(t, h.lock(ctx)) // goroutine 2
					var other *RWMutex
					if kept {
						// A read hold keeps the hash, and with it the rr
						// field, past the final release: another owner's,
						// or for a write hold its owner's (a downgrade).
						other = c.RWMutex(name)
						if k.kind == "RWMutex" {
							other = c.RWMutex(name, WithOwner("svc"))
						}
						require.NoError(t, other.RLock(ctx))
					}
					hook.arm()
					done := make(chan error, 1)
					go func() { done <- h.unlock(ctx) }() // goroutine 1: count 1
					awaitRan(t, hook.ran)
					require.NoError(t, h.unlock(ctx)) // goroutine 2: count 0, released
					close(hook.proceed)
					require.NoError(t, <-done, "goroutine 1's Unlock ran as a partial release")
					if kept {
						require.NoError(t, other.RUnlock(ctx))
					}
					n, err := rdb.Exists(ctx, h.key).Result()
					require.NoError(t, err)
					require.Zero(t, n)
				})
			})
		}
	}
}

// TestUnlockOfForceUnlockedHoldReservingItsTaker: a Mutex's hold is
// force-unlocked (the watchdog has not noticed yet). The operator's
// wake-up wakes a waiter of the holder's Client, whose attempt takes the
// lock; before that attempt's reply is back, the holder's Unlock reserves
// that very waiter for a local transfer. The script finds the lock held by
// the waiter's owner with the waiter's request: it took that for a resend
// of a transfer that had run, and the Unlock returned nil, as if it had
// released a hold it had lost. It must return ErrNotHeld (Mutex.Unlock:
// "ErrNotHeld when ... the hold was lost"). (Found by a reviewer.)
func TestUnlockOfForceUnlockedHoldReservingItsTaker(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, rdb := plainClient(t, b)
		name := redistest.UniqueName(t)
		holder, waiter := c.Mutex(name), c.Mutex(name)
		gate := newOwnerGate(lockScript, waiter.e.owner, true)
		rdb.AddHook(gate)
		require.NoError(t, holder.Lock(ctx)) // loads the scripts
		require.NoError(t, holder.Unlock(ctx))

		require.NoError(t, holder.Lock(ctx))
		got := make(chan error, 1)
		go func() { got <- waiter.Lock(ctx) }()
		require.Eventually(t, func() bool {
			_, waiting := c.ps.reserveLocal(holder.e.channel, false, 0)
			return waiting
		}, 5*time.Second, time.Millisecond)
		time.Sleep(50 * time.Millisecond) // the waiter sleeps
		gate.arm()
		ok, err := c.Mutex(name).ForceUnlock(ctx) // wakes the waiter
		require.NoError(t, err)
		require.True(t, ok)
		<-gate.held // the waiter's attempt took the lock; its reply is held

		err = holder.Unlock(ctx)
		close(gate.proceed)
		require.NoError(t, <-got)
		require.ErrorIs(t, err, ErrNotHeld, "the holder's hold was force-unlocked; the waiter took the lock itself")
		tok, err2 := rdb.HGet(ctx, waiter.e.key, "t").Int64()
		require.NoError(t, err2)
		require.Equal(t, tok, waiter.Token())
		require.NoError(t, waiter.Unlock(ctx))
	})
}

// TestRWLateUnqueueKeepsNextPlace: a writer's Lock that gave up leaves the
// writers' queue late (in the background after an attempt refused until
// its ctx ended, see Client.cleanupAfter), after the same handle's next
// Lock has queued. The late unqueue named only the owner: it removed the
// waiting place of that next Lock, and another owner's reader got in ahead
// of the waiting writer.
func TestRWLateUnqueueKeepsNextPlace(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, rdb := plainClient(t, b)
		name := redistest.UniqueName(t)
		holder := c.RWMutex(name, WithOwner("holder"))
		require.NoError(t, holder.RLock(ctx))
		writer := c.RWMutex(name, WithOwner("writer"))
		locked := make(chan error, 1)
		go func() { locked <- writer.Lock(ctx) }()
		require.Eventually(t, func() bool {
			return rdb.HExists(ctx, writer.key, "ww:writer").Val()
		}, 5*time.Second, time.Millisecond, "the writer queues")

		writer.unqueue(ctx, newID()) // the late unqueue of an earlier Lock
		ok, err := c.RWMutex(name, WithOwner("reader")).TryRLock(ctx)
		require.NoError(t, err)
		require.False(t, ok, "a reader got in ahead of the waiting writer")
		require.NoError(t, holder.RUnlock(ctx))
		require.NoError(t, <-locked)
		require.NoError(t, writer.Unlock(ctx))
	})
}

// TestRWReleaseResentAfterUnqueue: reader a's RUnlock runs in Redis
// while a writer waits (its place keeps the hash, which remembers a's
// release in rr); the reply is lost and go-redis resends it. Meanwhile the
// writer gave up: its unqueue removed the last lease of the hash, which
// went, rr with it. The resend must be recognised as the release that
// ran, not reported as ErrNotHeld. Found by a reviewer.
func TestRWReleaseResentAfterUnqueue(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, c, hook, rdb := hookedClient(t, b, rwRUnlockScript, true)
		name := redistest.UniqueName(t)
		a := c.RWMutex(name)
		require.NoError(t, a.RLock(ctx)) // loads the scripts
		require.NoError(t, a.RUnlock(ctx))

		require.NoError(t, a.RLock(ctx))
		// A writer waits (its Lock's place, written as rw_lock.lua does).
		now, err := rdb.Time(ctx).Result()
		require.NoError(t, err)
		require.NoError(t, rdb.HSet(ctx, a.key, "ww:writer",
			strconv.FormatInt(now.Add(10*time.Second).UnixMilli(), 10)).Err())
		writer := c.RWMutex(name, WithOwner("writer"))

		hook.arm()
		done := make(chan error, 1)
		go func() { done <- a.RUnlock(ctx) }()
		awaitRan(t, hook.ran)
		writer.unqueue(ctx, "") // the writer gives up: the hash goes
		n, err := rdb.Exists(ctx, a.key).Result()
		require.NoError(t, err)
		require.Zero(t, n)
		close(hook.proceed)
		require.NoError(t, <-done, "a's RUnlock ran, but its resend was not recognised")
	})
}

// refuseScriptHook fails the calls of script while armed, unsent, as a
// connection lost before the write does (go-redis's retries failed): every
// one, or with fails > 0 the first fails only, the next ones (a resend)
// held for delay before they go.
type refuseScriptHook struct {
	passHook
	script *redis.Script
	fails  int32
	delay  time.Duration
	armed  atomic.Bool
	seen   atomic.Int32
}

func (h *refuseScriptHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.armed.Load() && strings.EqualFold(cmd.Name(), "evalsha") {
			if s, _ := cmd.Args()[1].(string); s == h.script.Hash() {
				if n := h.seen.Add(1); h.fails == 0 || n <= h.fails {
					cmd.SetErr(io.ErrUnexpectedEOF)
					return io.ErrUnexpectedEOF
				}
				time.Sleep(h.delay)
			}
		}
		return next(ctx, cmd)
	}
}

// TestDoubleFailedReleaseThenReentry: a release fails with no reply (it
// never reached Redis), and so does its resend (Redis was unreachable for
// the resend's 2s too). The hold's count stays in Redis, unrenewed: it must
// run out with its lease. The handle, which holds nothing, goes on taking
// and releasing the lock; a handle that holds nothing must not re-enter
// that count (as ReentrantMutex's mayReenter ensures), or every
// acquisition renews it and another owner never gets in.
func TestDoubleFailedReleaseThenReentry(t *testing.T) {
	type fns struct {
		lock   func(context.Context) error
		try    func(context.Context) (bool, error)
		unlock func(context.Context) error
	}
	kinds := []struct {
		name    string
		release **redis.Script
		holder  func(c *Client, n string) fns
		waiter  func(c *Client, n string) fns
	}{
		{"ReentrantMutex", &unlockScript,
			func(c *Client, n string) fns { m := c.ReentrantMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} },
			func(c *Client, n string) fns { m := c.ReentrantMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} }},
		{"FairMutex", &fairUnlockScript,
			func(c *Client, n string) fns { m := c.FairMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} },
			func(c *Client, n string) fns { m := c.FairMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} }},
		{"RWMutex", &rwUnlockScript,
			func(c *Client, n string) fns { m := c.RWMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} },
			func(c *Client, n string) fns { m := c.RWMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} }},
		{"RWMutexRead", &rwRUnlockScript,
			func(c *Client, n string) fns { m := c.RWMutex(n); return fns{m.RLock, m.TryRLock, m.RUnlock} },
			func(c *Client, n string) fns { m := c.RWMutex(n); return fns{m.Lock, m.TryLock, m.Unlock} }},
	}
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				timeout := 600 * time.Millisecond
				name := redistest.UniqueName(t)
				rdb := b.Client(t)
				hook := &refuseScriptHook{script: *k.release}
				rdb.AddHook(hook)
				c := New(rdb, WithWatchdogTimeout(timeout))
				t.Cleanup(func() { _ = c.Close() })
				h := k.holder(c, name)
				require.NoError(t, h.lock(ctx))
				hook.armed.Store(true)
				require.Error(t, h.unlock(ctx))
				require.Eventually(t, func() bool { return hook.seen.Load() >= 2 }, 5*time.Second, time.Millisecond,
					"the release was not resent")
				// The resend failed too: let it end before Redis answers again.
				require.Eventually(t, func() bool {
					c.waitMu.Lock()
					defer c.waitMu.Unlock()
					return c.waits == 0
				}, 5*time.Second, time.Millisecond)
				hook.armed.Store(false)

				wc := New(b.Client(t), WithWatchdogTimeout(timeout))
				t.Cleanup(func() { _ = wc.Close() })
				w := k.waiter(wc, name)
				got := make(chan error, 1)
				var wg sync.WaitGroup
				wg.Add(1)
				go func() { defer wg.Done(); got <- w.lock(ctx) }()
				defer wg.Wait()
				deadline := time.After(5 * timeout)
				for {
					select {
					case err := <-got:
						require.NoError(t, err)
						require.NoError(t, w.unlock(ctx))
						return
					case <-deadline:
						cancel()
						t.Fatal("the waiter never got in: the holder kept re-entering the count its failed release left")
					case <-time.After(timeout / 4):
					}
					ok, err := h.try(ctx)
					require.NoError(t, err)
					if ok {
						require.NoError(t, h.unlock(ctx))
					}
				}
			})
		}
	})
}

// TestLockAfterFailedRUnlockWaitsForResend: an RUnlock fails with no reply
// and counts as done (its release is resent in the background); the handle
// holds nothing. Its Lock is no upgrade: it must wait for the read hold the
// resend ends (as the handle's RLock and Lock do for a hold whose release
// is in flight), not fail at once with ErrUpgrade.
func TestLockAfterFailedRUnlockWaitsForResend(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, _, _, m, hook := rwAfterFailedRUnlock(t, b, 400*time.Millisecond)

		start := time.Now()
		require.NoError(t, m.Lock(ctx), "the handle holds no read lock: no upgrade")
		require.GreaterOrEqual(t, hook.seen.Load(), int32(2), "the resend landed first")
		require.Less(t, time.Since(start), 5*time.Second, "woken when the resend landed")
		require.NoError(t, m.Unlock(ctx))
	})
}

// TestLockWithRLockWaitingOnFailedRUnlockIsNoUpgrade: an RUnlock fails with
// no reply and counts as done (its release is resent in the background,
// held here); the handle holds no read lock. One goroutine's RLock of the
// handle waits for that read hold to end (it may not re-enter it, see
// mayReenter): it holds nothing. Another goroutine's Lock of the handle is
// then no upgrade either: like the Lock of TestLockAfterFailedRUnlockWaitsForResend
// it must wait for the read hold the resend ends, not fail at once with
// ErrUpgrade because an RLock of the handle is under way.
func TestLockWithRLockWaitingOnFailedRUnlockIsNoUpgrade(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		rlocks := &countScriptHook{script: rwRLockScript}
		ctx, rdb, c, m, _ := rwAfterFailedRUnlock(t, b, time.Second, rlocks)

		before := rlocks.done.Load()
		rlocked := make(chan error, 1)
		go func() { rlocked <- m.RLock(ctx) }()
		// The RLock found the owner's read hold it may not re-enter (its
		// attempts before and after it joined the readers' channel), and
		// sleeps there.
		require.Eventually(t, func() bool {
			c.ps.mu.Lock()
			defer c.ps.mu.Unlock()
			ch := c.ps.chans[m.rwake]
			return ch != nil && len(ch.waiters) > 0 && rlocks.done.Load() >= before+2
		}, 3*time.Second, time.Millisecond)
		time.Sleep(20 * time.Millisecond) // its second reply reaches the handle
		stale, err := rdb.HExists(ctx, m.key, "rc:"+m.owner).Result()
		require.NoError(t, err)
		require.True(t, stale, "the resend landed already: the test proves nothing")

		err = m.Lock(ctx)
		require.False(t, errors.Is(err, ErrUpgrade),
			"the handle holds no read lock (its RLock waits, and the owner's read hold is the failed RUnlock's): no upgrade")
		require.NoError(t, err)
		requireDowngradedThenFree(t, ctx, m, rlocked)
	})
}

// countScriptHook counts the calls of script that got their reply.
type countScriptHook struct {
	passHook
	script *redis.Script
	done   atomic.Int32
}

func (h *countScriptHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if n := strings.ToLower(cmd.Name()); n == "evalsha" || n == "eval" {
			if s, _ := cmd.Args()[1].(string); s == h.script.Hash() {
				h.done.Add(1)
			}
		}
		return err
	}
}

// TestLockWithFailedRLockReplyOnItsWayIsNoUpgrade: as in
// TestLockWithRLockWaitingOnFailedRUnlockIsNoUpgrade, the owner's read hold
// in Redis is a failed RUnlock's (its resend held back) and the handle
// holds no read lock; a goroutine's RLock of the handle waits for that read
// hold. Its attempt ran in Redis and failed, but its reply is still on the
// way when another goroutine's Lock (or TryLock) of the handle gets its
// reply of 2. The handle holds no read lock, and that attempt took none:
// no upgrade. The Lock must wait for the read hold the resend ends; the
// TryLock reports the lock busy.
func TestLockWithFailedRLockReplyOnItsWayIsNoUpgrade(t *testing.T) {
	forLockAndTryLock(t, func(t *testing.T, name string, try bool) {
		redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
			gate := &scriptGate{script: rwRLockScript, after: true, held: make(chan struct{}), proceed: make(chan struct{})}
			ctx, rdb, _, m, _ := rwAfterFailedRUnlock(t, b, time.Second, gate)

			// Its attempt fails in Redis; the reply is held back.
			rlocked, release := rlockReplyHeld(t, ctx, m, gate)
			stale, err := rdb.HExists(ctx, m.key, "rc:"+m.owner).Result()
			require.NoError(t, err)
			require.True(t, stale, "the resend landed already: the test proves nothing")

			locked := lockOrTry(ctx, m, try, "TryLock took the lock under the owner's read hold")
			select {
			case err := <-locked:
				if !try {
					t.Fatalf("Lock returned %v while the stale read hold is there", err)
				}
				require.NoError(t, err, "no read lock of the handle: not an upgrade")
			case <-time.After(200 * time.Millisecond):
				if try {
					release()
					require.NoError(t, <-locked, "no read lock of the handle: not an upgrade")
				}
			}
			release()
			if try {
				// The waiting RLock enters once the resend ends the hold.
				require.NoError(t, <-rlocked)
				require.NoError(t, m.RUnlock(ctx))
				requireRWFree(t, ctx, m)
			} else {
				require.NoError(t, <-locked, "the Lock waits for the resend, then takes the lock")
				requireDowngradedThenFree(t, ctx, m, rlocked)
			}
		})
	})
}

// rwAfterFailedRUnlock returns a test ctx and an RWMutex m of a Client c
// on b's client rdb (with hooks added after the one below) whose RUnlock
// of its one read hold failed with no reply: it counts as done, and its
// release is resent in the background, delay later (hook, which refused
// it: see refuseScriptHook). The owner's read hold stays in Redis till
// then; the handle holds none.
func rwAfterFailedRUnlock(t *testing.T, b redistest.Backend, delay time.Duration, hooks ...redis.Hook) (context.Context, redis.UniversalClient, *Client, *RWMutex, *refuseScriptHook) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	t.Cleanup(cancel)
	rdb := b.Client(t)
	hook := &refuseScriptHook{script: rwRUnlockScript, fails: 1, delay: delay}
	rdb.AddHook(hook)
	for _, h := range hooks {
		rdb.AddHook(h)
	}
	c := New(rdb)
	t.Cleanup(func() { _ = c.Close() })
	m := c.RWMutex(redistest.UniqueName(t))
	require.NoError(t, m.RLock(ctx))
	hook.armed.Store(true)
	require.Error(t, m.RUnlock(ctx), "the release is refused unsent, and resent later")
	return ctx, rdb, c, m, hook
}

// requireDowngradedThenFree requires the RLock of m whose result rlocked
// gives to enter with the owner's write hold (a downgrade), then releases
// both holds and requires the lock free.
func requireDowngradedThenFree(t *testing.T, ctx context.Context, m *RWMutex, rlocked <-chan error) {
	t.Helper()
	require.NoError(t, <-rlocked)
	require.NoError(t, m.Unlock(ctx))
	require.NoError(t, m.RUnlock(ctx))
	requireRWFree(t, ctx, m)
}

// requireRWFree requires m's lock free (no write or read hold).
func requireRWFree(t *testing.T, ctx context.Context, m *RWMutex) {
	t.Helper()
	held, err := m.IsLocked(ctx)
	require.NoError(t, err)
	require.False(t, held)
}

// TestUpgradeWithRLockReplyOnItsWayIsRefusedAtOnce: a goroutine holds the
// read lock of a handle; another goroutine's RLock of the same handle ran in
// Redis (a re-entry), its reply slow (held back here: a slow link, a WAIT
// for replicas, a stalled connection). A Lock or TryLock of the handle is
// then an upgrade whatever that reply says (the handle holds a read lock
// already): it must return ErrUpgrade at once, as documented, not wait for
// the other goroutine's reply.
func TestUpgradeWithRLockReplyOnItsWayIsRefusedAtOnce(t *testing.T) {
	forLockAndTryLock(t, func(t *testing.T, name string, try bool) {
		redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			rdb := b.Client(t)
			gate := &scriptGate{script: rwRLockScript, after: true, held: make(chan struct{}), proceed: make(chan struct{})}
			rdb.AddHook(gate)
			c := New(rdb)
			t.Cleanup(func() { _ = c.Close() })
			m := c.RWMutex(redistest.UniqueName(t))

			require.NoError(t, m.RLock(ctx)) // this goroutine reads

			// Its attempt re-enters in Redis; the reply is held back.
			rlocked, release := rlockReplyHeld(t, ctx, m, gate)

			locked := lockOrTry(ctx, m, try, "TryLock took the write lock under the handle's read hold")
			var err error
			select {
			case err = <-locked:
			case <-time.After(3 * time.Second):
				release()
				err = <-locked
				t.Errorf("%s of a handle holding the read lock waited for another goroutine's RLock reply (returned %v only after it came)", name, err)
			}
			require.ErrorIs(t, err, ErrUpgrade)

			release()
			require.NoError(t, <-rlocked)
			require.NoError(t, m.RUnlock(ctx))
			require.NoError(t, m.RUnlock(ctx))
			requireRWFree(t, ctx, m)
		})
	})
}

// forLockAndTryLock runs f as a subtest for Lock and for TryLock (try).
func forLockAndTryLock(t *testing.T, f func(t *testing.T, name string, try bool)) {
	for _, try := range []bool{false, true} {
		name := "Lock"
		if try {
			name = "TryLock"
		}
		t.Run(name, func(t *testing.T) { f(t, name, try) })
	}
}

// lockOrTry starts m.Lock, or m.TryLock when try is set (taking the lock
// is then an error: taken), and returns its result's channel.
func lockOrTry(ctx context.Context, m *RWMutex, try bool, taken string) <-chan error {
	locked := make(chan error, 1)
	go func() {
		if try {
			ok, err := m.TryLock(ctx)
			if err == nil && ok {
				err = errors.New(taken)
			}
			locked <- err
			return
		}
		locked <- m.Lock(ctx)
	}()
	return locked
}

// rlockReplyHeld arms gate (an after gate on rwRLockScript) and starts an
// RLock of m, whose attempt runs in Redis and whose reply gate holds back
// until release (called at the test's end at the latest); it returns the
// RLock's result channel.
func rlockReplyHeld(t *testing.T, ctx context.Context, m *RWMutex, gate *scriptGate) (<-chan error, func()) {
	t.Helper()
	gate.mu.Lock()
	gate.armed = true
	gate.mu.Unlock()
	rlocked := make(chan error, 1)
	go func() { rlocked <- m.RLock(ctx) }()
	<-gate.held
	var once sync.Once
	release := func() { once.Do(func() { close(gate.proceed) }) }
	t.Cleanup(release)
	return rlocked, release
}

// TestLockKeepsWaitingPlace: the owner's read hold in Redis is a failed
// RUnlock's (its resend held back; a fixed lease), and the handle holds no
// read lock. A Lock of the handle waits for that read hold as for another
// owner's, and takes its waiting place (new readers queue behind it; the
// watchdog renews the place). Then a goroutine's RLock of the handle sends
// an attempt, which fails in Redis, its reply slow (held back here: a slow
// link, a stalled pooled connection, a WAIT for replicas), and the Lock,
// woken, tries again: answered 2 (a reply that leaves the place as it
// was), it waits for that reply. The place must stay renewed:
//   - ReplyHeld: while the Lock waits for that reply, the attempt kept the
//     place marked as being released (setReleasing) for the whole wait;
//   - NoUpgradeRetry: once the reply came, the Lock found the handle holds
//     no read lock and tried again as no upgrade, leaving the place marked
//     for good.
//
// The watchdog renewed it no more, the place ran out after its lease (the
// watchdog timeout) while the Lock still waited, and readers of other
// owners got in ahead of the waiting writer.
func TestLockKeepsWaitingPlace(t *testing.T) {
	for _, held := range []bool{true, false} {
		name := "NoUpgradeRetry"
		if held {
			name = "ReplyHeld"
		}
		t.Run(name, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				const wdt = 500 * time.Millisecond
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				rdb := b.Client(t)
				refuse := &refuseScriptHook{script: rwRUnlockScript, fails: 1, delay: 4 * time.Second}
				gate := &scriptGate{script: rwRLockScript, after: true, held: make(chan struct{}), proceed: make(chan struct{})}
				locks := &countScriptHook{script: rwLockScript}
				rdb.AddHook(refuse)
				rdb.AddHook(gate)
				rdb.AddHook(locks)
				c := New(rdb, WithWatchdogTimeout(wdt))
				t.Cleanup(func() { _ = c.Close() })
				name := redistest.UniqueName(t)
				// A fixed lease: the stale read hold stays in the Lock's way.
				m := c.RWMutex(name, WithLease(6*time.Second))
				require.NoError(t, m.RLock(ctx))
				refuse.armed.Store(true)
				require.Error(t, m.RUnlock(ctx), "the release is refused unsent, and resent later")

				// The Lock waits for the stale read hold, in its waiting place.
				locked := make(chan error, 1)
				go func() { locked <- m.Lock(ctx) }()
				require.Eventually(t, func() bool {
					c.ps.mu.Lock()
					ch := c.ps.chans[m.wwake]
					n := ch != nil && len(ch.waiters) > 0
					c.ps.mu.Unlock()
					if !n {
						return false
					}
					ok, err := rdb.HExists(ctx, m.key, "ww:"+m.owner).Result()
					return err == nil && ok
				}, 3*time.Second, time.Millisecond)
				time.Sleep(20 * time.Millisecond) // its attempt after the join replied

				// An RLock attempt of the handle fails in Redis (it may not
				// re-enter the stale read hold); its reply is held back.
				rlocked, release := rlockReplyHeld(t, ctx, m, gate)

				// The Lock tries again: answered 2, it waits for that reply.
				before := locks.done.Load()
				c.ps.dispatch(m.wwake, wakeAll)
				require.Eventually(t, func() bool { return locks.done.Load() > before }, 3*time.Second, time.Millisecond)
				if !held {
					time.Sleep(20 * time.Millisecond)
					release()
					// The Lock finds no read lock of the handle, tries
					// again, and waits for the stale read hold again; so
					// does the RLock.
					time.Sleep(100 * time.Millisecond)
				}

				// Three place leases later, the writer still waits, in its place.
				time.Sleep(3 * wdt)
				stale, err := rdb.HExists(ctx, m.key, "rc:"+m.owner).Result()
				require.NoError(t, err)
				require.True(t, stale, "the stale read hold ended already: the test proves nothing")
				select {
				case err := <-locked:
					t.Fatalf("the Lock returned %v while the stale read hold is there", err)
				default:
				}
				// The place's lease (server ms) is still ahead.
				until, err := rdb.HGet(ctx, m.key, "ww:"+m.owner).Int64()
				placeErr := err
				now, err := rdb.Time(ctx).Result()
				require.NoError(t, err)
				other := New(b.Client(t))
				t.Cleanup(func() { _ = other.Close() })
				r := other.RWMutex(name)
				in, err := r.TryRLock(ctx)
				require.NoError(t, err)
				if in {
					require.NoError(t, r.RUnlock(ctx))
				}
				release()
				require.False(t, in, "another owner's reader got in ahead of the waiting writer")
				require.NoError(t, placeErr, "the waiting writer's place is gone: the watchdog stopped renewing it")
				require.GreaterOrEqual(t, until, now.UnixMilli(), "the waiting writer's place ran out: the watchdog stopped renewing it")

				// The Lock gets in once the stale read hold ends; the RLock
				// enters with it (a downgrade).
				require.NoError(t, <-locked)
				requireDowngradedThenFree(t, ctx, m, rlocked)
			})
		})
	}
}

// TestEndedCtxUnlockFailureResent: a deferred Unlock(ctx) whose ctx has
// ended already goes with a fresh cleanup context; when that release fails
// with no reply from Redis (go-redis's retries failed), it must be sent
// again in the background, as the Unlock docs promise for any failure with
// no reply. It was not (the release had been sent with a cleanup context,
// which resendRelease took for a resend): the lock stayed taken by nobody
// for its whole lease (30s by default), and a shared-owner ReentrantMutex
// that kept re-entering kept the leaked count, and every other owner out,
// for good. (Found by a fault-injection stress.)
func TestEndedCtxUnlockFailureResent(t *testing.T) {
	kinds := []struct {
		name string
		make func(c *Client, name string) (lock, unlock func(context.Context) error)
	}{
		{"Mutex", func(c *Client, n string) (func(context.Context) error, func(context.Context) error) {
			m := c.Mutex(n)
			return m.Lock, m.Unlock
		}},
		{"ReentrantMutex", func(c *Client, n string) (func(context.Context) error, func(context.Context) error) {
			m := c.ReentrantMutex(n)
			return m.Lock, m.Unlock
		}},
		{"ReentrantMutexWithOwner", func(c *Client, n string) (func(context.Context) error, func(context.Context) error) {
			m := c.ReentrantMutex(n, WithOwner("shared-"+n))
			return m.Lock, m.Unlock
		}},
	}
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				name := redistest.UniqueName(t)
				rdb := b.Client(t)
				hook := &refuseScriptHook{script: unlockScript, fails: 1} // the first release fails unsent
				rdb.AddHook(hook)
				c := New(rdb) // default watchdog timeout: a 30s lease
				t.Cleanup(func() { _ = c.Close() })
				lock, unlock := k.make(c, name)
				require.NoError(t, lock(ctx))

				hook.armed.Store(true)
				ended, end := context.WithCancel(ctx)
				end() // a deferred Unlock after the request's ctx ended
				require.Error(t, unlock(ended), "the release was refused")

				requireOtherOwnerGetsIn(t, ctx, b.Client(t), name, "the failed release was not resent: the lock stays taken by nobody for its lease")
			})
		})
	}
}

// TestFailedUndoResent: a Lock's attempt runs in Redis (the lock is taken)
// but its reply comes after the call's ctx ended, so the acquisition is
// undone; that undo fails with no reply (go-redis's retries failed). It
// must be sent again in the background, as a release is: it was not, and
// the lock stayed held by nobody for its whole lease (30s by default; for
// good while a reentrant owner kept re-entering it). (From a
// fault-injection stress by a reviewer.)
func TestFailedUndoResent(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		rdb := b.Client(t)
		refuse := &refuseScriptHook{script: unlockScript, fails: 1}
		gate := newReplyHook(lockScript, false)
		gate.lostErr = io.ErrUnexpectedEOF // returned once the Lock's ctx has ended
		rdb.AddHook(refuse)
		rdb.AddHook(gate)
		name, m := warmMutex(t, ctx, rdb)

		gate.arm()
		refuse.armed.Store(true)
		short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancelShort()
		locked := make(chan error, 1)
		go func() { locked <- m.Lock(short) }()
		awaitRan(t, gate.ran) // the attempt took the lock in Redis; its reply is lost
		<-short.Done()
		close(gate.proceed)
		require.Error(t, <-locked, "the Lock's ctx ended before its reply")
		require.Eventually(t, func() bool { return refuse.seen.Load() >= 1 }, 5*time.Second, time.Millisecond,
			"the undo was not sent")

		requireOtherOwnerGetsIn(t, ctx, b.Client(t), name, "the failed undo was not resent: the lock stays taken by nobody for its lease")
	})
}

// warmMutex returns a lock name and a Mutex of it on a new Client on rdb
// (default watchdog timeout: a 30s lease), locked and unlocked once: the
// scripts are loaded.
func warmMutex(t *testing.T, ctx context.Context, rdb redis.UniversalClient) (string, *Mutex) {
	t.Helper()
	c := New(rdb)
	t.Cleanup(func() { _ = c.Close() })
	name := redistest.UniqueName(t)
	m := c.Mutex(name)
	require.NoError(t, m.Lock(ctx))
	require.NoError(t, m.Unlock(ctx))
	return name, m
}

// requireOtherOwnerGetsIn requires a Mutex of name on another Client, on
// rdb, to take the lock within 5s (why: what kept it out otherwise), and
// releases it.
func requireOtherOwnerGetsIn(t *testing.T, ctx context.Context, rdb redis.UniversalClient, name, why string) {
	t.Helper()
	other := New(rdb)
	t.Cleanup(func() { _ = other.Close() })
	requireTakesSoon(t, ctx, other.Mutex(name), 5*time.Second, why)
}

// requireTakesSoon requires l to take its lock within d (its TryLock
// polled), then releases it: what a failed or given-up call left behind is
// not held by nobody for a lease.
func requireTakesSoon(t *testing.T, ctx context.Context, l interface {
	TryLock(context.Context) (bool, error)
	Unlock(context.Context) error
}, d time.Duration, msgAndArgs ...any) {
	t.Helper()
	require.Eventually(t, func() bool {
		ok, err := l.TryLock(ctx)
		return err == nil && ok
	}, d, 20*time.Millisecond, msgAndArgs...)
	require.NoError(t, l.Unlock(ctx))
}

// fairWithdrawalRig returns a test's ctx and lock name, and a client of b
// whose first FairMutex release or withdrawal, once armed, fails unsent.
func fairWithdrawalRig(t *testing.T, b redistest.Backend) (context.Context, string, redis.UniversalClient, *refuseScriptHook) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	rdb := b.Client(t)
	refuse := &refuseScriptHook{script: fairUnlockScript, fails: 1}
	rdb.AddHook(refuse)
	return ctx, redistest.UniqueName(t), rdb, refuse
}

// fairQueued waits until n waiters are queued for the fair lock f.
func fairQueued(t *testing.T, ctx context.Context, b redistest.Backend, f *FairMutex, n int64) {
	t.Helper()
	rdb := b.Client(t)
	require.Eventually(t, func() bool { return rdb.ZCard(ctx, f.queue).Val() == n }, 5*time.Second, time.Millisecond,
		"%d waiters did not queue", n)
}

// TestFairFailedWithdrawalResent: FairMutex waiter W1 gives up (its ctx
// ends) and withdraws its place; the withdrawal fails with no reply (it
// never reached Redis). It must be sent again in the background, as a
// failed release or undo is: it was not, so W1's place stayed in the queue,
// unrenewed, until it expired (the watchdog timeout, 30s by default); the
// holder's Unlock handed the lock to that dead place, and W2, queued behind
// W1, waited for the place's expiry.
func TestFairFailedWithdrawalResent(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, name, rdb, refuse := fairWithdrawalRig(t, b)
		cw := New(rdb) // default watchdog timeout: 30s queue places
		t.Cleanup(func() { _ = cw.Close() })
		ch := New(b.Client(t))
		t.Cleanup(func() { _ = ch.Close() })
		c2 := New(b.Client(t))
		t.Cleanup(func() { _ = c2.Close() })

		w1 := cw.FairMutex(name)
		require.NoError(t, w1.Lock(ctx)) // the scripts loaded
		require.NoError(t, w1.Unlock(ctx))
		holder := ch.FairMutex(name)
		require.NoError(t, holder.Lock(ctx))

		short, cancelShort := context.WithCancel(ctx)
		w1Err := make(chan error, 1)
		go func() { w1Err <- w1.Lock(short) }()
		fairQueued(t, ctx, b, w1, 1)
		w2 := c2.FairMutex(name)
		w2Err := make(chan error, 1)
		go func() { w2Err <- w2.Lock(ctx) }()
		fairQueued(t, ctx, b, w1, 2)

		refuse.armed.Store(true)
		cancelShort() // W1 gives up; its withdrawal fails unsent
		require.Error(t, <-w1Err)
		require.GreaterOrEqual(t, refuse.seen.Load(), int32(1), "the withdrawal was not sent")

		require.NoError(t, holder.Unlock(ctx))
		select {
		case err := <-w2Err:
			require.NoError(t, err)
			require.NoError(t, w2.Unlock(ctx))
		case <-time.After(5 * time.Second):
			t.Fatalf("W2 did not get the lock: the failed withdrawal was not resent, W1's dead place (queue %v) holds the lock %v",
				b.Client(t).ZRange(ctx, w1.queue, 0, -1).Val(), b.Client(t).HGetAll(ctx, w1.key).Val())
		}
	})
}

// TestFairGrantRacingFailedWithdrawal: the lock is handed to WithLease
// waiter W1 just as its ctx ends: its claiming attempt runs in Redis, but
// its reply comes after the ctx ended, so W1 withdraws, which must release
// the grant; that withdrawal fails with no reply. Unless it is resent, the
// lock stays held by nobody for W1's lease.
func TestFairGrantRacingFailedWithdrawal(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(map[bool]string{false: "WithdrawalOK", true: "WithdrawalFails"}[fail], func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, name, rdb, refuse := fairWithdrawalRig(t, b)
				gate := newReplyHook(fairLockScript, false)
				gate.lostErr = io.ErrUnexpectedEOF
				gate.only = func(cmd redis.Cmder) bool { // the attempt that claims the grant
					res, err := cmd.(*redis.Cmd).Int64Slice()
					return err == nil && len(res) > 0 && res[0] == 1
				}
				rdb.AddHook(gate)
				cw := New(rdb)
				t.Cleanup(func() { _ = cw.Close() })
				ch := New(b.Client(t))
				t.Cleanup(func() { _ = ch.Close() })

				w1 := cw.FairMutex(name, WithLease(30*time.Second)) // claims a grant with an attempt
				require.NoError(t, w1.Lock(ctx))                    // the scripts loaded
				require.NoError(t, w1.Unlock(ctx))
				holder := ch.FairMutex(name)
				require.NoError(t, holder.Lock(ctx))

				short, cancelShort := context.WithCancel(ctx)
				defer cancelShort()
				w1Err := make(chan error, 1)
				gate.arm() // W1's attempts before the grant find the lock taken
				go func() { w1Err <- w1.Lock(short) }()
				fairQueued(t, ctx, b, w1, 1)

				refuse.armed.Store(fail)
				require.NoError(t, holder.Unlock(ctx)) // granted to W1, which claims it
				select {
				case <-gate.ran: // claimed in Redis; the reply is lost
				case err := <-w1Err:
					t.Fatalf("W1's Lock returned %v before its claim", err)
				case <-ctx.Done():
					t.Fatal("W1 did not claim its grant")
				}
				cancelShort()
				close(gate.proceed)
				require.Error(t, <-w1Err, "W1's ctx ended before its claim's reply")
				if fail {
					require.Eventually(t, func() bool { return refuse.seen.Load() >= 1 }, 5*time.Second, time.Millisecond,
						"the withdrawal was not sent")
				}
				other := New(b.Client(t))
				t.Cleanup(func() { _ = other.Close() })
				requireTakesSoon(t, ctx, other.FairMutex(name), 5*time.Second,
					"the grant to W1 was leaked: the lock stays held by nobody for W1's lease")
			})
		})
	}
}

// replOffset returns the master's replication offset (INFO replication).
func replOffset(t *testing.T, ctx context.Context, rdb *redis.Client) int64 {
	t.Helper()
	info, err := rdb.Info(ctx, "replication").Result()
	require.NoError(t, err)
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "master_repl_offset:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			require.NoError(t, err)
			return n
		}
	}
	t.Fatal("no master_repl_offset")
	return 0
}

// TestAcquisitionRetryIsReplicated: the retry of an acquisition (same
// request id: its reply was lost) that finds its own hold must still write
// something that reaches the replicas. Under WithReplicaSync the retry comes
// on a new connection (go-redis drops the one whose reply was lost), and on
// Redis 7.2 and later WAIT counts only the writes of its own connection: a
// retry that writes nothing is followed by a WAIT that returns at once with
// every replica counted, although the hold (written on the old connection)
// may have reached none. A write of the retry's own, replicated after the
// hold's, makes the WAIT cover the hold.
func TestAcquisitionRetryIsReplicated(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	master := redistest.NewServer(t)
	host, port, _ := net.SplitHostPort(master.Addr)
	replica := redistest.NewServer(t, "--replicaof", host, port)
	rdb := master.Client(t)
	require.Eventually(t, func() bool {
		info := replica.Client(t).Info(ctx, "replication").Val()
		return strings.Contains(info, "master_link_status:up")
	}, 15*time.Second, 20*time.Millisecond)
	c := New(rdb)
	t.Cleanup(func() { _ = c.Close() })
	name := redistest.UniqueName(t)
	s := c.Semaphore(name, 3)
	e := newExcl(c, name, false, []LockOption{WithLease(time.Minute)})
	f := c.FairMutex(name+"-fair", WithLease(time.Minute))

	fairRun := func(id string) func() []int64 {
		return func() []int64 {
			member := id + "|60000|" + strconv.FormatInt(f.placeMs, 10) + "|" + c.ps.id + "|" + f.owner
			res, err := fairLockScript.Run(ctx, rdb, f.keys, "PUBLISH", fenceRetention(f.lease), id, member, f.owner,
				60000, f.placeMs, "1", "w").Slice()
			require.NoError(t, err)
			return []int64{res[0].(int64)}
		}
	}
	for _, tc := range []struct {
		kind string
		key  string // when set, its TTL is raised past the lease before the retry
		run  func() []int64
	}{
		{"Semaphore", "", func() []int64 {
			member := s.owner + "|" + "retried-sem" + "|1"
			res, err := semAcquireScript.Run(ctx, rdb, []string{s.key, s.fence}, member, 1, 3, 60000).Int64Slice()
			require.NoError(t, err)
			return res
		}},
		{"FairMutex", f.key, fairRun("retried-fair")},
		{"FairMutex re-entry", f.key, fairRun("retried-fair-reentry")},
		{"Mutex", e.key, func() []int64 {
			res, err := lockScript.Run(ctx, rdb, []string{e.key, e.fence}, e.owner, 60000, "retried-lock", "0", 600000).Slice()
			require.NoError(t, err)
			return []int64{res[0].(int64)}
		}},
	} {
		res := tc.run()
		require.EqualValues(t, 1, res[0], "%s: taken", tc.kind)
		if tc.key != "" {
			// Another handle of the owner holds it on a longer lease (or
			// the retry comes within the same millisecond): the retry's
			// lease does not lengthen it.
			require.NoError(t, rdb.PExpire(ctx, tc.key, 2*time.Minute).Err())
		}
		before := replOffset(t, ctx, rdb)
		res = tc.run() // the retry
		require.EqualValues(t, 1, res[0], "%s: taken, by the retry too", tc.kind)
		require.Greater(t, replOffset(t, ctx, rdb), before,
			"%s: the retry wrote nothing replicated: a WAIT after it on a new connection does not cover the hold", tc.kind)
	}
}

// TestBusyRefusedUndoResent: a Lock's attempt runs in Redis (the lock is
// taken) but its reply comes after the call's ctx ended, so the acquisition
// is undone; Redis refuses that undo with BUSY (another client's script runs
// past busy-reply-threshold). BUSY means the script did not run, but
// resendRelease resent only releases that got no reply: the undo was
// dropped, and the lock stayed held by nobody for its whole lease (30s by
// default). A refused cleanup must be sent again, with a short backoff,
// within the cleanup timeout. (Found by a reviewer.)
func TestBusyRefusedUndoResent(t *testing.T) {
	srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rdb := srv.Client(t)
	gate := newReplyHook(lockScript, false)
	rdb.AddHook(gate)
	name, m := warmMutex(t, ctx, rdb)

	gate.arm()
	short, cancelShort := context.WithCancel(ctx)
	defer cancelShort()
	locked := make(chan error, 1)
	go func() { locked <- m.Lock(short) }()
	awaitRan(t, gate.ran) // the attempt took the lock in Redis; its reply is lost

	busy := srv.BusyFor(t, 400*time.Millisecond) // the undo is refused
	cancelShort()
	close(gate.proceed)
	require.Error(t, <-locked, "the Lock's ctx ended before its reply")
	require.NoError(t, <-busy)

	requireOtherOwnerGetsIn(t, ctx, srv.Client(t), name, "the BUSY-refused undo was not resent: the lock stays taken by nobody for its lease")
}

// TestBusyRefusedUndoResentRWAndSem: as TestBusyRefusedUndoResent, for an
// RWMutex write or read acquisition's undo and a Semaphore acquisition's
// undo, which a busy Redis refuses (BUSY: it did not run). They were not
// resent at all, after no reply either. (Found by a reviewer.)
func TestBusyRefusedUndoResentRWAndSem(t *testing.T) {
	rwFree := func(ctx context.Context, c *Client, name string) (bool, error) {
		m := c.RWMutex(name)
		ok, err := m.TryLock(ctx)
		if ok {
			require.NoError(t, m.Unlock(ctx))
		}
		return ok, err
	}
	kinds := []struct {
		kind   string
		script *redis.Script
		take   func(c *Client, name string) func(context.Context) error
		free   func(ctx context.Context, c *Client, name string) (bool, error)
	}{
		{"rw-write", rwLockScript,
			func(c *Client, name string) func(context.Context) error { return c.RWMutex(name).Lock },
			rwFree},
		{"rw-read", rwRLockScript,
			func(c *Client, name string) func(context.Context) error { return c.RWMutex(name).RLock },
			rwFree},
		{"semaphore", semAcquireScript,
			func(c *Client, name string) func(context.Context) error {
				s := c.Semaphore(name, 1)
				return func(ctx context.Context) error { return s.Acquire(ctx, 1) }
			},
			func(ctx context.Context, c *Client, name string) (bool, error) {
				s := c.Semaphore(name, 1)
				ok, err := s.TryAcquire(ctx, 1)
				if ok {
					require.NoError(t, s.Release(ctx, 1))
				}
				return ok, err
			}},
	}
	for _, k := range kinds {
		t.Run(k.kind, func(t *testing.T) {
			srv := redistest.NewServer(t, "--busy-reply-threshold", "50")
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			rdb := srv.Client(t)
			gate := newReplyHook(k.script, false)
			rdb.AddHook(gate)
			c := New(rdb)
			t.Cleanup(func() { _ = c.Close() })
			name := redistest.UniqueName(t)
			// The script loaded: the gated EVALSHA runs it.
			require.NoError(t, k.script.Load(ctx, rdb).Err())
			take := k.take(c, name)
			other := New(srv.Client(t))
			t.Cleanup(func() { _ = other.Close() })
			ok, err := k.free(ctx, other, name)
			require.NoError(t, err)
			require.True(t, ok)

			gate.arm()
			short, cancelShort := context.WithCancel(ctx)
			defer cancelShort()
			locked := make(chan error, 1)
			go func() { locked <- take(short) }()
			awaitRan(t, gate.ran) // the attempt took it in Redis; its reply is lost

			busy := srv.BusyFor(t, 400*time.Millisecond) // the undo is refused
			cancelShort()
			close(gate.proceed)
			require.Error(t, <-locked, "the call's ctx ended before its reply")
			require.NoError(t, <-busy)

			require.Eventually(t, func() bool {
				ok, err := k.free(ctx, other, name)
				return err == nil && ok
			}, 5*time.Second, 20*time.Millisecond, "the BUSY-refused undo was not resent: the hold stays taken by nobody for its lease")
		})
	}
}
