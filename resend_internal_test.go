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

// resendHook, once armed, runs the next call of script twice, as go-redis
// does when the reply of a command is lost (MaxRetries): the first run
// reaches Redis, then the hook waits until proceed is closed (others run
// meanwhile) and sends the same command again, whose reply the caller gets.
type resendHook struct {
	script  *redis.Script
	mu      sync.Mutex
	armed   bool
	ran     chan struct{}
	proceed chan struct{}
}

func (h *resendHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *resendHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *resendHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if name := strings.ToLower(cmd.Name()); name == "evalsha" {
			if s, _ := cmd.Args()[1].(string); s == h.script.Hash() {
				h.mu.Lock()
				gate := h.armed
				h.armed = false
				h.mu.Unlock()
				if gate {
					_ = next(ctx, cmd) // executed; "the reply is lost"
					close(h.ran)
					<-h.proceed
					return next(ctx, cmd) // the resend
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
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				rdb := b.Client(t)
				hook := &resendHook{script: tc.script, ran: make(chan struct{}), proceed: make(chan struct{})}
				rdb.AddHook(hook)
				c := New(rdb)
				t.Cleanup(func() { _ = c.Close() })
				name := redistest.UniqueName(t)
				a := tc.make(c, name, WithOwner("svc"))
				bh := tc.make(c, name, WithOwner("svc"))
				require.NoError(t, a.lock(ctx)) // loads the scripts
				require.NoError(t, a.unlock(ctx))

				require.NoError(t, a.lock(ctx))
				hook.mu.Lock()
				hook.armed = true
				hook.mu.Unlock()
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
