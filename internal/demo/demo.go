// Package demo gives the examples a Redis: the server at REDIS_ADDR when it
// is set, else an embedded miniredis, so that every example runs on a
// machine with no Redis installed.
package demo

import (
	"fmt"
	"os"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Redis returns a client and a function that releases it (and stops the
// embedded server, if one was started). It prints which Redis it uses.
func Redis() (*redis.Client, func()) {
	if addr := os.Getenv("REDIS_ADDR"); addr != "" {
		fmt.Printf("using Redis at %s\n", addr)
		rdb := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true})
		return rdb, func() { _ = rdb.Close() }
	}
	m := miniredis.NewMiniRedis()
	if err := m.StartAddr("127.0.0.1:0"); err != nil {
		fmt.Fprintln(os.Stderr, "cannot start the embedded miniredis:", err)
		os.Exit(1)
	}
	fmt.Printf("using an embedded miniredis at %s (set REDIS_ADDR to use a real Redis)\n", m.Addr())
	stop := Tick(m)
	rdb := redis.NewClient(&redis.Options{Addr: m.Addr(), ContextTimeoutEnabled: true})
	return rdb, func() {
		_ = rdb.Close()
		stop()
		m.Close()
	}
}

// Tick makes miniredis's keys expire in real time: miniredis only ages keys
// when told to, so a goroutine fast-forwards it every 10ms by the time that
// passed. The returned function stops the goroutine.
func Tick(m *miniredis.Miniredis) (stop func()) {
	done, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		last := time.Now()
		for {
			select {
			case <-done:
				return
			case now := <-t.C:
				m.FastForward(now.Sub(last))
				last = now
			}
		}
	}()
	return func() { close(done); <-exited }
}
