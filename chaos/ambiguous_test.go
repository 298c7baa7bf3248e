package chaos_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/chaos"
)

// ambiguousSetup returns a redlatch Client through a proxy with the
// DropReplies toxic on its downstream, a direct admin client, and the lock
// key layout. The scripts are loaded and the client's connection is open,
// so that the next reply through the proxy is the script's.
func ambiguousSetup(t *testing.T, maxRetries int, ctxTimeouts bool) (*redlatch.Client, *redis.Client, *chaos.Proxy) {
	t.Helper()
	s := newServer(t)
	p := newProxy(t, s.Addr)
	admin := rdbOf(t, s.Addr)
	rdb := rdbOf(t, p.Addr, func(o *redis.Options) {
		o.MaxRetries, o.PoolSize, o.ContextTimeoutEnabled = maxRetries, 1, ctxTimeouts
	})
	c := redlatch.New(rdb, redlatch.WithWatchdogTimeout(time.Second))
	t.Cleanup(func() { _ = c.Close() })
	ctx := ctxT(t, 10*time.Second)
	warm := c.ReentrantMutex("warm-up")
	if err := warm.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := warm.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	chaos.DropBudget.Store(0)
	if err := p.AddToxic("drop", chaos.DropReplies, "downstream", nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { chaos.DropBudget.Store(0) })
	return c, admin, p
}

// The reply to an acquisition is lost after the server ran it, and the
// Redis client retries: the retry is recognised, the lock is held once, with
// the token the server issued. No false failure, no double count. A Mutex
// shows the first (an unrecognised retry finds the lock held by its own
// owner, and fails), a ReentrantMutex the second (it would re-enter, count
// 2). The server's slow log shows that it ran the very call twice.
func TestAmbiguousAcquireRetried(t *testing.T) {
	for _, kind := range []string{"mutex", "reentrant"} {
		t.Run(kind, func(t *testing.T) {
			c, admin, _ := ambiguousSetup(t, 3, false)
			ctx := ctxT(t, 10*time.Second)
			var m interface {
				TryLock(context.Context) (bool, error)
				Unlock(context.Context) error
				Token() int64
			}
			if kind == "mutex" {
				m = c.Mutex("amb", redlatch.WithOwner("me"))
			} else {
				m = c.ReentrantMutex("amb", redlatch.WithOwner("me"))
			}
			for _, kv := range [][2]string{{"slowlog-log-slower-than", "0"}, {"slowlog-max-len", "1024"}} {
				if err := admin.ConfigSet(ctx, kv[0], kv[1]).Err(); err != nil {
					t.Fatal(err)
				}
			}
			_ = admin.SlowLogReset(ctx).Err()
			chaos.DropBudget.Store(1)
			ok, err := m.TryLock(ctx)
			if err != nil || !ok {
				t.Fatalf("TryLock after a lost reply = %v, %v; want true, nil (the retry is recognised)", ok, err)
			}
			if chaos.DropBudget.Load() != 0 {
				t.Fatal("no reply was dropped")
			}
			ranTwice(ctx, t, admin, "2", "the acquisition")
			v, err := admin.HMGet(ctx, "{amb}:lock", "o", "c", "t").Result()
			if err != nil {
				t.Fatal(err)
			}
			if v[0] != "me" || v[1] != "1" || v[2] == nil {
				t.Fatalf("lock hash after a retried acquisition = %v; want owner me, count 1", v)
			}
			if tok := v[2].(string); tok != itoa(m.Token()) {
				t.Errorf("Token() = %d, server issued %s", m.Token(), tok)
			}
			// The reply to the release is lost too: the retry does not fail.
			_ = admin.SlowLogReset(ctx).Err()
			chaos.DropBudget.Store(1)
			if err := m.Unlock(ctx); err != nil {
				t.Errorf("Unlock after a lost reply: %v", err)
			}
			if chaos.DropBudget.Load() != 0 {
				t.Fatal("no reply to the release was dropped")
			}
			ranTwice(ctx, t, admin, "3", "the release")
			if n, _ := admin.Exists(ctx, "{amb}:lock").Result(); n != 0 {
				t.Error("the lock is still held after Unlock")
			}
		})
	}
}

// ranTwice checks in the server's slow log (every command logged, see
// TestAmbiguousAcquireRetried) that the server ran one script call on the
// lock, with numkeys keys, twice with the same arguments (the same request
// id): the run whose reply was dropped, and the Redis client's retry.
func ranTwice(ctx context.Context, t *testing.T, admin *redis.Client, numkeys, what string) {
	t.Helper()
	logs, err := admin.SlowLogGet(ctx, -1).Result()
	if err != nil {
		t.Fatal(err)
	}
	runs := map[string]int{}
	for _, l := range logs {
		if len(l.Args) > 4 && strings.EqualFold(l.Args[0], "evalsha") && l.Args[2] == numkeys && l.Args[3] == "{amb}:lock" {
			runs[strings.Join(l.Args, " ")]++
		}
	}
	for call, n := range runs {
		if n == 2 {
			t.Logf("%s ran twice: %s", what, call)
			return
		}
	}
	t.Errorf("%s: want one call run twice by the server (lost reply, retry); runs: %v", what, runs)
}

// The reply to an acquisition is lost and the Redis client does not retry:
// Lock fails with the network error, and the acquisition the server ran is
// undone at once. No leaked hold, no false success. When the undo cannot
// reach Redis either (drops 2: the reply to the new connection's handshake is
// dropped too), the orphaned hold is not renewed and frees within its lease.
func TestAmbiguousAcquireNotRetried(t *testing.T) {
	for _, drops := range []int64{1, 2} {
		c, admin, _ := ambiguousSetup(t, -1, false)
		ctx := ctxT(t, 10*time.Second)
		m := c.Mutex("amb")
		chaos.DropBudget.Store(drops)
		start := time.Now()
		err := m.Lock(ctx)
		if err == nil {
			t.Fatalf("drops %d: Lock succeeded though its reply was lost", drops)
		}
		if errors.Is(err, redlatch.ErrNotObtained) || errors.Is(err, redlatch.ErrNotHeld) {
			t.Errorf("drops %d: Lock = %v; want the network error, not a verdict", drops, err)
		}
		if m.Token() != 0 {
			t.Errorf("drops %d: Token() = %d after a failed Lock", drops, m.Token())
		}
		if left := chaos.DropBudget.Load(); left != 0 {
			t.Errorf("drops %d: %d replies left undropped: the scenario did not happen as described", drops, left)
		}
		n, _ := admin.Exists(ctx, "{amb}:lock").Result()
		if drops == 1 && n != 0 {
			t.Errorf("drops %d: the hold taken by the failed Lock was not undone", drops)
		}
		other := redlatch.New(admin)
		err = other.Mutex("amb").Lock(ctx)
		_ = other.Close()
		if d := time.Since(start); err != nil || d > time.Second+slack {
			t.Errorf("drops %d: another client took the lock after %v (%v); bound lease 1s + %v", drops, d, err, slack)
		} else {
			t.Logf("drops %d: orphan left %v; another client took the lock %v after the ambiguous Lock began", drops, n == 1, d)
		}
		_ = admin.FlushAll(ctx)
	}
}

// The reply never comes (a blackhole on the downstream after the server ran
// the acquisition), nor does the undo's: Lock fails when its context ends,
// and the lock is free again within its lease (plus the undo's bound). Only
// replies are blackholed: the undo reaches Redis and runs, so in practice no
// orphan is left (TestAmbiguousAcquireNotRetried's second case leaves one).
//
// The Redis client has ContextTimeoutEnabled (see
// TestLockHonoursContextOnDefaultOptions for a client without it).
func TestAmbiguousAcquireReplyNeverComes(t *testing.T) {
	replyNeverComes(t, true)
}

// The same on go-redis's default options (ContextTimeoutEnabled off):
// Lock returned only after about 10s, go-redis waiting for its ReadTimeout
// (3s) for the attempt whatever its ctx said, and again for the undo. New
// now sends redlatch's script calls through a clone of the client with the
// option on, and Lock returns as it does above.
func TestLockHonoursContextOnDefaultOptions(t *testing.T) {
	replyNeverComes(t, false)
}

func replyNeverComes(t *testing.T, ctxTimeouts bool) {
	c, admin, p := ambiguousSetup(t, -1, ctxTimeouts)
	if err := p.AddToxic("hole", "timeout", "downstream", map[string]any{"timeout": 0}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	m := c.Mutex("amb")
	start := time.Now()
	err := m.Lock(ctx)
	if err == nil || !errors.Is(err, redlatch.ErrNotObtained) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock = %v; want a failed wait (ErrNotObtained and DeadlineExceeded)", err)
	}
	took := time.Since(start)
	t.Logf("Lock returned after %v: %v", took, err)
	if took > 300*time.Millisecond+2*time.Second+slack {
		t.Errorf("Lock(ctx 300ms) returned after %v: its context and the undo's 2s bound were overrun", took)
	}
	bg := ctxT(t, 10*time.Second)
	if n, _ := admin.Exists(bg, "{amb}:lock").Result(); n == 0 {
		t.Log("the acquisition did not reach the server, or was undone")
	}
	other := redlatch.New(admin)
	defer other.Close()
	if err := other.Mutex("amb").Lock(bg); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second+slack+2*time.Second { // lease + slack + the undo's bounded try
		t.Errorf("the orphaned hold lasted %v; bound: lease 1s + slack + 2s undo", d)
	} else {
		t.Logf("lock free again %v after the ambiguous Lock began", d)
	}
}

func itoa(n int64) string { return fmtInt(n) }
