package redlatch_test

import (
	"context"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// blindReleaseHook, once armed, fails the next read of the lock (a
// pipeline with an HMGET) and the next release matching match without
// sending them, as a link down fails them after every retry of go-redis.
// The resend that follows is held (a slow link) until proceed is closed,
// at its first command, a read or the release (closing held); done is
// closed once its release has run.
type blindReleaseHook struct {
	passHook
	match   func(redis.Cmder) bool
	read    atomic.Bool
	release atomic.Bool
	resend  atomic.Bool // the next command of the resend is held
	sent    atomic.Bool // the next release is the resend's
	held    chan struct{}
	proceed chan struct{}
	done    chan struct{}
}

func newBlindReleaseHook(match func(redis.Cmder) bool) *blindReleaseHook {
	return &blindReleaseHook{match: match, held: make(chan struct{}), proceed: make(chan struct{}), done: make(chan struct{})}
}

func (h *blindReleaseHook) arm() {
	h.read.Store(true)
	h.release.Store(true)
}

// hold holds the resend's first command until proceed is closed.
func (h *blindReleaseHook) hold() {
	if h.resend.CompareAndSwap(true, false) {
		close(h.held)
		<-h.proceed
	}
}

func (h *blindReleaseHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !h.match(cmd) {
			return next(ctx, cmd)
		}
		if h.release.CompareAndSwap(true, false) {
			h.resend.Store(true)
			h.sent.Store(true)
			cmd.SetErr(io.ErrUnexpectedEOF)
			return io.ErrUnexpectedEOF
		}
		h.hold()
		err := next(ctx, cmd)
		if h.sent.CompareAndSwap(true, false) {
			close(h.done)
		}
		return err
	}
}

func (h *blindReleaseHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if strings.ToLower(cmd.Name()) != "hmget" {
				continue
			}
			if h.read.CompareAndSwap(true, false) {
				for _, c := range cmds {
					c.SetErr(io.ErrUnexpectedEOF)
				}
				return io.ErrUnexpectedEOF
			}
			h.hold()
		}
		return next(ctx, cmds)
	}
}

// blindKind is a lock of one kind, taken and released by a handle of
// owner id owner on c, and a handle of another owner that reports whether
// the lock keeps it out.
type blindKind struct {
	kind  string
	match func(name string) func(redis.Cmder) bool
	make  func(c *redlatch.Client, name, owner string) (lock, unlock func(context.Context) error)
	other func(c *redlatch.Client, name string) func(context.Context) (bool, error)
}

var blindKinds = []blindKind{
	{"Mutex", func(name string) func(redis.Cmder) bool { return scriptWith("{" + name + "}:wake") },
		func(c *redlatch.Client, name, owner string) (func(context.Context) error, func(context.Context) error) {
			m := c.Mutex(name, redlatch.WithOwner(owner))
			return m.Lock, m.Unlock
		},
		func(c *redlatch.Client, name string) func(context.Context) (bool, error) {
			m := c.Mutex(name)
			return func(ctx context.Context) (bool, error) { return excludedBy(ctx, m.TryLock, m.Unlock) }
		}},
	{"FairMutex", func(name string) func(redis.Cmder) bool { return scriptWith(fairKey(name)) },
		func(c *redlatch.Client, name, owner string) (func(context.Context) error, func(context.Context) error) {
			m := c.FairMutex(name, redlatch.WithOwner(owner))
			return m.Lock, m.Unlock
		},
		func(c *redlatch.Client, name string) func(context.Context) (bool, error) {
			m := c.FairMutex(name)
			return func(ctx context.Context) (bool, error) { return excludedBy(ctx, m.TryLock, m.Unlock) }
		}},
	{"RWMutexWrite", func(name string) func(redis.Cmder) bool { return scriptWith(writersWakeKey(name)) },
		func(c *redlatch.Client, name, owner string) (func(context.Context) error, func(context.Context) error) {
			m := c.RWMutex(name, redlatch.WithOwner(owner))
			return m.Lock, m.Unlock
		},
		func(c *redlatch.Client, name string) func(context.Context) (bool, error) {
			m := c.RWMutex(name)
			return func(ctx context.Context) (bool, error) { return excludedBy(ctx, m.TryRLock, m.RUnlock) }
		}},
	{"RWMutexRead", func(name string) func(redis.Cmder) bool { return scriptWith(writersWakeKey(name)) },
		func(c *redlatch.Client, name, owner string) (func(context.Context) error, func(context.Context) error) {
			m := c.RWMutex(name, redlatch.WithOwner(owner))
			return m.RLock, m.RUnlock
		},
		func(c *redlatch.Client, name string) func(context.Context) (bool, error) {
			m := c.RWMutex(name)
			return func(ctx context.Context) (bool, error) { return excludedBy(ctx, m.TryLock, m.Unlock) }
		}},
}

// excludedBy reports whether the attempt try is kept out; it releases what
// it took.
func excludedBy(ctx context.Context, try func(context.Context) (bool, error), release func(context.Context) error) (bool, error) {
	ok, err := try(ctx)
	if err != nil {
		return false, err
	}
	if ok {
		return false, release(ctx)
	}
	return true, nil
}

// TestBlindUnlockResendSparesLaterHold: a WithOwner handle that holds
// nothing itself unlocks the hold of another handle of its owner id, but
// the link fails both the read of that hold's token (or, for a read hold,
// of the request that began it) and the release. The release names no
// hold then, and its resend, which comes late, released whatever hold the
// owner had when it landed: a later hold, taken after the other handle
// had unlocked its own, was released under its holder (whose Lost stays
// open).
func TestBlindUnlockResendSparesLaterHold(t *testing.T) {
	for _, k := range blindKinds {
		t.Run(k.kind, func(t *testing.T) {
			redistest.ForEach(t, func(t *testing.T, b redistest.Backend) {
				ctx := ctxT(t, 20*time.Second)
				name := redistest.UniqueName(t)
				owner := "owner-" + name
				lock, unlock := k.make(newClient(t, b), name, owner)
				rdb := b.Client(t)
				hook := newBlindReleaseHook(k.match(name))
				rdb.AddHook(hook)
				_, blindUnlock := k.make(newClientOn(t, rdb), name, owner)
				excluded := k.other(newClient(t, b), name)

				require.NoError(t, lock(ctx))
				hook.arm()
				require.Error(t, blindUnlock(ctx))
				// A resend, if any, is held before it reaches Redis.
				resent := false
				select {
				case <-hook.held:
					resent = true
				case <-time.After(time.Second):
				}

				// The first hold ends by its own release; the owner takes
				// the lock again before the resend lands.
				require.NoError(t, unlock(ctx))
				require.NoError(t, lock(ctx))
				close(hook.proceed)
				if resent {
					<-hook.done
				}

				out, err := excluded(ctx)
				require.NoError(t, err)
				require.True(t, out, "the resend of a release that named no hold released the owner's later hold")
				require.NoError(t, unlock(ctx))
			})
		})
	}
}
