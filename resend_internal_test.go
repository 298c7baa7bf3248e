package redlatch

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch/internal/redistest"
)

// replyHook, once armed, lets the next call of script run in Redis, then
// waits until proceed is closed (others run meanwhile) and answers the
// caller as a lost reply does: with resend set, go-redis sends the same
// command again (MaxRetries), whose reply the caller gets; else the call
// fails with its context's error, which the test has cancelled meanwhile
// (the caller gave up while its attempt was on the way, and undoes it).
type replyHook struct {
	script  *redis.Script
	resend  bool
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
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	rdb := b.Client(t)
	hook := newReplyHook(script, resend)
	rdb.AddHook(hook)
	c := New(rdb)
	t.Cleanup(func() { _ = c.Close() })
	return ctx, c, hook, rdb
}

func (h *replyHook) arm() {
	h.mu.Lock()
	h.armed = true
	h.mu.Unlock()
}

func (h *replyHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *replyHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
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
					_ = next(context.WithoutCancel(ctx), cmd) // it runs; its reply is lost
					close(h.ran)
					<-h.proceed
					if h.resend {
						return next(ctx, cmd)
					}
					cmd.SetErr(ctx.Err())
					return ctx.Err()
				}
			}
		}
		return next(ctx, cmd)
	}
}

// TestFullUnlockResentAfterRelock: handles a and b share the owner id
// "svc"; b, which tracks no hold (so it names no token), releases the hold
// a took. Its reply is lost and go-redis resends it; meanwhile a took the
// lock again. The resend must be recognised as the release done already,
// not release a's new hold, which would let another owner in while a holds
// the lock. (Found by a reviewer on RWMutex; the exclusive locks had the
// same gap.)
func TestFullUnlockResentAfterRelock(t *testing.T) {
	type handle struct {
		lock, unlock func(context.Context) error
		tryLock      func(context.Context) (bool, error)
		lost         func() <-chan struct{}
	}
	for _, tc := range []struct {
		kind   string
		script *redis.Script
		make   func(c *Client, name string, opts ...LockOption) handle
	}{
		{"ReentrantMutex", unlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.ReentrantMutex(name, opts...)
			return handle{m.Lock, m.Unlock, m.TryLock, m.Lost}
		}},
		{"FairMutex", fairUnlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.FairMutex(name, opts...)
			return handle{m.Lock, m.Unlock, m.TryLock, m.Lost}
		}},
		{"RWMutex", rwUnlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.RWMutex(name, opts...)
			return handle{m.Lock, m.Unlock, m.TryLock, m.Lost}
		}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, hook, _ := hookedClient(t, b, tc.script, true)
				name := redistest.UniqueName(t)
				a := tc.make(c, name, WithOwner("svc"))
				bh := tc.make(c, name, WithOwner("svc"))
				require.NoError(t, a.lock(ctx)) // loads the scripts
				require.NoError(t, a.unlock(ctx))

				require.NoError(t, a.lock(ctx))
				hook.arm()
				done := make(chan error, 1)
				go func() { done <- bh.unlock(ctx) }() // releases a's hold
				<-hook.ran
				require.NoError(t, a.lock(ctx)) // a new hold of "svc"
				close(hook.proceed)
				require.NoError(t, <-done)

				select {
				case <-a.lost():
					t.Fatal("Lost closed")
				default:
				}
				w := New(b.Client(t))
				t.Cleanup(func() { _ = w.Close() })
				other := tc.make(w, name)
				ok, err := other.tryLock(ctx)
				require.NoError(t, err)
				if ok {
					_ = other.unlock(ctx)
				}
				require.False(t, ok, "another owner got in while a holds the lock")
				require.NoError(t, a.unlock(ctx))
			})
		})
	}
}

// reentrantKinds are the reentrant holds of one owner, with the scripts
// that take and release them.
var reentrantKinds = []struct {
	kind         string
	lock, unlock **redis.Script
	make         func(c *Client, name string) (lock, unlock func(context.Context) error, key string)
}{
	{"ReentrantMutex", &lockScript, &unlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, string) {
		m := c.ReentrantMutex(name)
		return m.Lock, m.Unlock, m.e.key
	}},
	{"FairMutex", &fairLockScript, &fairUnlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, string) {
		m := c.FairMutex(name)
		return m.Lock, m.Unlock, m.key
	}},
	{"RWMutex", &rwLockScript, &rwUnlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, string) {
		m := c.RWMutex(name)
		return m.Lock, m.Unlock, m.key
	}},
	{"RWMutexRead", &rwRLockScript, &rwRUnlockScript, func(c *Client, name string) (func(context.Context) error, func(context.Context) error, string) {
		m := c.RWMutex(name)
		return m.RLock, m.RUnlock, m.key
	}},
}

// TestPartialUnlockResentAfterInterleave: three goroutines share a handle,
// each holding the lock once (count 3). One Unlock's reply is lost and
// go-redis resends it; meanwhile another goroutine's Unlock ran. The resend
// is recognised (the hold remembers its last few partial releases, not only
// the latest): the count is 1, not 0, and no writer gets in while the third
// goroutine holds. (Found by a reviewer on RWMutex.)
func TestPartialUnlockResentAfterInterleave(t *testing.T) {
	for _, k := range reentrantKinds {
		t.Run(k.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, hook, _ := hookedClient(t, b, *k.unlock, true)
				name := redistest.UniqueName(t)
				lock, unlock, _ := k.make(c, name)
				require.NoError(t, lock(ctx)) // loads the scripts
				require.NoError(t, unlock(ctx))
				for i := 0; i < 3; i++ {
					require.NoError(t, lock(ctx))
				}
				hook.arm()
				done := make(chan error, 1)
				go func() { done <- unlock(ctx) }() // goroutine 1
				<-hook.ran
				require.NoError(t, unlock(ctx)) // goroutine 2
				close(hook.proceed)
				require.NoError(t, <-done)

				w := New(b.Client(t))
				t.Cleanup(func() { _ = w.Close() })
				otherLock, otherUnlock, _ := reentrantKinds[0].make(w, name)
				if k.kind != "ReentrantMutex" {
					m := w.RWMutex(name)
					otherLock, otherUnlock = m.Lock, m.Unlock
					if k.kind == "FairMutex" {
						f := w.FairMutex(name)
						otherLock, otherUnlock = f.Lock, f.Unlock
					}
				}
				tctx, tcancel := context.WithTimeout(ctx, 200*time.Millisecond)
				err := otherLock(tctx)
				tcancel()
				if err == nil {
					_ = otherUnlock(ctx)
				}
				require.Error(t, err, "another owner got in while the third goroutine holds")
				require.NoError(t, unlock(ctx)) // goroutine 3
			})
		})
	}
}

// TestUndoAfterConcurrentReentry: two goroutines share a handle. One Lock
// gives up (ctx) while its attempt is on the way; the attempt took (or
// re-entered) the hold, and before its undo runs the other goroutine's Lock
// re-entered it. The undo recognises its acquisition among the hold's last
// few (not only the latest) and takes it back: after the one Lock that
// succeeded is released, nothing is held. (Found by a reviewer on RWMutex;
// it leaked a hold until its lease ran out.)
func TestUndoAfterConcurrentReentry(t *testing.T) {
	for _, k := range reentrantKinds {
		t.Run(k.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, c, hook, rdb := hookedClient(t, b, *k.lock, false)
				name := redistest.UniqueName(t)
				lock, unlock, key := k.make(c, name)
				require.NoError(t, lock(ctx)) // loads the scripts
				require.NoError(t, unlock(ctx))

				hook.arm()
				gctx, gcancel := context.WithCancel(ctx)
				done := make(chan error, 1)
				go func() { done <- lock(gctx) }() // goroutine 1
				<-hook.ran
				require.NoError(t, lock(ctx)) // goroutine 2
				gcancel()
				close(hook.proceed)
				require.ErrorIs(t, <-done, ErrNotObtained)
				require.NoError(t, unlock(ctx)) // goroutine 2 is done too
				n, err := rdb.Exists(ctx, key).Result()
				require.NoError(t, err)
				require.Zero(t, n, "every Lock that succeeded was released, yet the owner still holds: %v",
					rdb.HGetAll(ctx, key).Val())
			})
		})
	}
}

// TestPartialUnlockResentAfterRelock: like TestFullUnlockResentAfterRelock,
// but the sibling's tokenless release is a partial one (count 2 -> 1). Its
// reply is lost; before go-redis resends it, a releases the last hold and
// takes the lock again (a new hold, count 1). The resend is neither the
// fence key's last full release nor in the new hold's u list: it must not
// release a's new hold, and does not, since a release that names no hold
// first reads the owner's current one and names it. (Found by a reviewer.)
func TestPartialUnlockResentAfterRelock(t *testing.T) {
	type handle struct {
		lock, unlock func(context.Context) error
		tryLock      func(context.Context) (bool, error)
		lost         func() <-chan struct{}
	}
	for _, tc := range []struct {
		kind   string
		script *redis.Script
		make   func(c *Client, name string, opts ...LockOption) handle
	}{
		{"ReentrantMutex", unlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.ReentrantMutex(name, opts...)
			return handle{m.Lock, m.Unlock, m.TryLock, m.Lost}
		}},
		{"FairMutex", fairUnlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.FairMutex(name, opts...)
			return handle{m.Lock, m.Unlock, m.TryLock, m.Lost}
		}},
		{"RWMutex", rwUnlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.RWMutex(name, opts...)
			return handle{m.Lock, m.Unlock, m.TryLock, m.Lost}
		}},
		{"RWMutexRead", rwRUnlockScript, func(c *Client, name string, opts ...LockOption) handle {
			m := c.RWMutex(name, opts...)
			return handle{m.RLock, m.RUnlock, m.TryLock, m.Lost} // other: a writer
		}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				rdb := b.Client(t)
				hook := newReplyHook(tc.script, true)
				rdb.AddHook(hook)
				c := New(rdb)
				t.Cleanup(func() { _ = c.Close() })
				name := redistest.UniqueName(t)
				a := tc.make(c, name, WithOwner("svc"))
				bh := tc.make(c, name, WithOwner("svc"))
				require.NoError(t, a.lock(ctx)) // loads the scripts
				require.NoError(t, a.unlock(ctx))

				require.NoError(t, a.lock(ctx))
				require.NoError(t, a.lock(ctx)) // count 2
				hook.arm()
				done := make(chan error, 1)
				go func() { done <- bh.unlock(ctx) }() // partial: count 1
				<-hook.ran
				require.NoError(t, a.unlock(ctx)) // count 0: released
				require.NoError(t, a.lock(ctx))   // a new hold of "svc", count 1
				close(hook.proceed)
				if err := <-done; err != nil {
					// The resend cannot tell its hold from a's new one: a
					// wrong ErrNotHeld is the safe answer, not a release.
					require.ErrorIs(t, err, ErrNotHeld)
					t.Logf("b's Unlock, whose release happened: %v", err)
				}

				w := New(b.Client(t))
				t.Cleanup(func() { _ = w.Close() })
				other := tc.make(w, name)
				ok, err := other.tryLock(ctx)
				require.NoError(t, err)
				if ok {
					_ = other.unlock(ctx)
				}
				require.False(t, ok, "another owner got in while a holds the lock")
				require.NoError(t, a.unlock(ctx))
			})
		})
	}
}

// TestTransferClaimedLateKeepsRedisExpiry: a Mutex Unlock hands the lock to
// a waiter of its Client (a transfer: the waiter's lease from the script's
// run). The reply is lost and go-redis resends the call 500 ms later; the
// resend finds the release done ({0, 0}) and the waiter retries its attempt,
// which lock.lua recognises (q holds its request id). The waiter tracks the
// hold from its retry's send time, so lock.lua restarts the lease then too
// (never shortening it); it did not, and the local deadline was ~500 ms
// later than Redis's expiry: another owner took the lock while the
// waiter's Lost was open. (Found by a reviewer.)
func TestTransferClaimedLateKeepsRedisExpiry(t *testing.T) {
	redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		rdb := b.Client(t)
		hook := newReplyHook(unlockScript, true)
		rdb.AddHook(hook)
		c := New(rdb)
		t.Cleanup(func() { _ = c.Close() })
		name := redistest.UniqueName(t)
		a := c.Mutex(name)
		bm := c.Mutex(name, WithLease(time.Second))
		require.NoError(t, a.Lock(ctx)) // loads the scripts
		require.NoError(t, a.Unlock(ctx))

		require.NoError(t, a.Lock(ctx))
		got := make(chan error, 1)
		go func() { got <- bm.Lock(ctx) }()
		require.Eventually(t, func() bool {
			_, waiting := c.ps.reserveLocal(a.e.channel, false)
			return waiting
		}, 5*time.Second, time.Millisecond)
		time.Sleep(50 * time.Millisecond) // b sleeps
		hook.arm()
		go func() {
			<-hook.ran
			time.Sleep(500 * time.Millisecond)
			close(hook.proceed)
		}()
		require.NoError(t, a.Unlock(ctx))
		require.NoError(t, <-got)

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

// TestFullUnlockResentAfterOtherOwnerCycle: TestFullUnlockResentAfterRelock
// with another owner's hold between: b's tokenless full release is resent
// after another owner took and released the lock (the fence key's last
// release is now that owner's) and a took it again. The resend, naming
// the hold it meant (see TestPartialUnlockResentAfterRelock), leaves a's new
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
		<-hook.ran
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
