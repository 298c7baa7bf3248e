package leakcheck

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if err := Check(5 * time.Second); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	os.Exit(code)
}

func TestCleanRunHasNoLeaks(t *testing.T) {
	require.NoError(t, Check(time.Second))
}

// blockedForever is a named function so that its stack is recognisable.
func blockedForever(stop <-chan struct{}, exited chan<- struct{}) {
	<-stop
	close(exited)
}

func TestReportsLeakedGoroutine(t *testing.T) {
	stop, exited := make(chan struct{}), make(chan struct{})
	go blockedForever(stop, exited)

	err := Check(100 * time.Millisecond)
	require.Error(t, err)
	require.Contains(t, err.Error(), "leakcheck.blockedForever")
	require.Contains(t, err.Error(), "created by github.com/redlatch/redlatch/internal/leakcheck.TestReportsLeakedGoroutine")

	close(stop)
	<-exited
	require.NoError(t, Check(time.Second))
}

func TestWaitsForExitingGoroutine(t *testing.T) {
	go time.Sleep(200 * time.Millisecond)
	require.NoError(t, Check(2*time.Second))
}

// A pub/sub subscription that is never closed leaves go-redis goroutines
// behind; they must be reported, and disappear once everything is closed.
func TestReportsGoRedisPubSub(t *testing.T) {
	m := miniredis.NewMiniRedis()
	require.NoError(t, m.StartAddr("127.0.0.1:0"))
	rdb := redis.NewClient(&redis.Options{Addr: m.Addr()})
	ps := rdb.Subscribe(context.Background(), "leakcheck")
	_, err := ps.Receive(context.Background())
	require.NoError(t, err)
	_ = ps.Channel() // starts the pub/sub's receive and health-check goroutines

	err = Check(100 * time.Millisecond)
	require.Error(t, err)
	require.True(t, strings.Contains(err.Error(), "github.com/redis/go-redis/v9"), err.Error())

	require.NoError(t, ps.Close())
	require.NoError(t, rdb.Close())
	m.Close()
	require.NoError(t, Check(5*time.Second))
}

func TestIgnored(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stack string
		want  bool
	}{
		{"test goroutine", "goroutine 7 [chan receive]:\ntesting.(*T).Run(0xc000003a40, {0x6b1b1a, 0x8}, 0x6d2f98)\n\t/go/src/testing/testing.go:1751 +0x3ab\ntesting.runTests.func1(0xc000003a40)\n\t/go/src/testing/testing.go:2168 +0x37\ntesting.tRunner(0xc000003a40, 0xc00006fc48)\n\t/go/src/testing/testing.go:1690 +0xf4\ncreated by testing.(*M).Run in goroutine 1\n\t/go/src/testing/testing.go:2100 +0x4a5", true},
		{"signal loop", "goroutine 5 [syscall]:\nos/signal.signal_recv()\n\t/go/src/runtime/sigqueue.go:152 +0x29\nos/signal.loop()\n\t/go/src/os/signal/signal_unix.go:23 +0x13\ncreated by os/signal.Notify.func1.1 in goroutine 1\n\t/go/src/os/signal/signal.go:151 +0x1f", true},
		{"runtime only", "goroutine 3 [GC worker (idle)]:\nruntime.gopark(0x0?, 0x0?, 0x0?, 0x0?, 0x0?)\n\t/go/src/runtime/proc.go:424 +0xce\nruntime.gcBgMarkWorker(0xc000024150)\n\t/go/src/runtime/mgc.go:1363 +0xe9\ncreated by runtime.gcBgMarkStartWorkers in goroutine 1\n\t/go/src/runtime/mgc.go:1279 +0x105", true},
		{"user", "goroutine 9 [select]:\nruntime.gopark(0x0?, 0x0?, 0x0?, 0x0?, 0x0?)\n\t/go/src/runtime/proc.go:424 +0xce\nruntime.selectgo(0xc, 0xc, 0x0?, 0x0, 0x0?, 0x1)\n\t/go/src/runtime/select.go:335 +0x7a5\ngithub.com/redis/go-redis/v9.(*PubSub).initHealthCheck.func1()\n\t/m/pubsub.go:720 +0x9c\ncreated by github.com/redis/go-redis/v9.(*PubSub).initHealthCheck in goroutine 8\n\t/m/pubsub.go:717 +0x7c", false},
		{"created by a test", "goroutine 9 [chan receive]:\nexample.com/p.worker(...)\n\t/p/p.go:1\ncreated by example.com/p.TestX in goroutine 8\n\t/p/p_test.go:3 +0x7c", false},
	} {
		t.Run(tc.name, func(t *testing.T) { require.Equal(t, tc.want, ignored(tc.stack)) })
	}
}

// TestIgnore: a prefix added with Ignore hides a tool's goroutine, and only
// that one.
func TestIgnore(t *testing.T) {
	tool := "goroutine 9 [chan send]:\nexample.com/tool.(*T).Pipe(0x1)\n\t/t/t.go:44 +0x51\ncreated by example.com/tool.Start in goroutine 8\n\t/t/l.go:109 +0x2a5"
	other := "goroutine 10 [chan send]:\nexample.com/p.worker(...)\n\t/p/p.go:1\ncreated by example.com/p.Start in goroutine 8\n\t/p/p.go:3 +0x7c"
	require.False(t, ignored(tool))
	Ignore("example.com/tool.(*T).Pipe")
	t.Cleanup(func() { also = nil })
	require.True(t, ignored(tool))
	require.False(t, ignored(other))
}
