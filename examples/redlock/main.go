// Command redlock takes a Redlock over five independent Redis masters:
// two workers contend for it, one master goes away, and the lock is still
// granted by the remaining majority; with three masters gone it is not.
//
//	go run ./examples/redlock     # five embedded miniredis servers
//	REDIS_ADDRS=host1:6379,host2:6379,host3:6379 go run ./examples/redlock
//
// With REDIS_ADDRS the masters are not stopped: the example only shows the
// contention and the validity.
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

func main() {
	ctx := context.Background()
	redis.SetLogger(quiet{}) // no dial errors of the stopped masters on stderr
	rdbs, minis, done := masters()
	defer done()

	// A process has one Client per master; each worker here plays a
	// separate process, with Clients of its own.
	newRedlock := func() (*redlatch.Redlock, func()) {
		var clients []*redlatch.Client
		for _, rdb := range rdbs {
			clients = append(clients, redlatch.New(rdb))
		}
		closeAll := func() {
			for _, c := range clients {
				_ = c.Close()
			}
		}
		return redlatch.NewRedlock("redlock-demo:nightly-report", clients,
			redlatch.WithLease(5*time.Second)), closeAll
	}

	var wg sync.WaitGroup
	for w := 1; w <= 2; w++ {
		lock, closeAll := newRedlock()
		defer closeAll()
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			if err := lock.Lock(ctx); err != nil {
				log.Fatal(err)
			}
			fmt.Printf("worker %d: holds the lock after %v, validity %v\n",
				w, time.Since(start).Round(time.Millisecond), lock.Validity().Round(time.Millisecond))
			select {
			case <-time.After(500 * time.Millisecond): // the work, well within the validity
			case <-lock.Lost(): // validity spent or a quorum gone: stop the work
				log.Printf("worker %d: lock lost", w)
			}
			if err := lock.Unlock(ctx); err != nil && !errors.Is(err, redlatch.ErrNotHeld) {
				log.Fatal(err)
			}
			fmt.Printf("worker %d: released it\n", w)
		}()
	}
	wg.Wait()

	if minis == nil {
		return
	}
	lock, closeAll := newRedlock()
	defer closeAll()
	for down := 1; down <= 3; down++ {
		minis[down-1].Close() // a master goes away
		ok, err := lock.TryLock(ctx)
		switch {
		case ok:
			fmt.Printf("%d of %d masters down: granted by the majority, validity %v\n",
				down, len(minis), lock.Validity().Round(time.Millisecond))
			if err := lock.Unlock(ctx); err != nil {
				log.Fatal(err)
			}
		case errors.Is(err, redlatch.ErrNotObtained):
			fmt.Printf("%d of %d masters down: refused: %v\n", down, len(minis), firstLine(err))
		default:
			log.Fatal(ok, err)
		}
	}
}

// masters returns a client per master: REDIS_ADDRS, or five embedded
// miniredis servers (returned too, so that the example can stop them).
func masters() ([]*redis.Client, []*miniredis.Miniredis, func()) {
	var rdbs []*redis.Client
	if addrs := os.Getenv("REDIS_ADDRS"); addrs != "" {
		fmt.Printf("using the Redis masters at %s\n", addrs)
		for _, a := range strings.Split(addrs, ",") {
			rdbs = append(rdbs, redis.NewClient(&redis.Options{Addr: strings.TrimSpace(a)}))
		}
		return rdbs, nil, func() {
			for _, r := range rdbs {
				_ = r.Close()
			}
		}
	}
	var minis []*miniredis.Miniredis
	var stops []func()
	for i := 0; i < 5; i++ {
		m := miniredis.NewMiniRedis()
		if err := m.StartAddr("127.0.0.1:0"); err != nil {
			log.Fatal("cannot start an embedded miniredis: ", err)
		}
		minis = append(minis, m)
		stops = append(stops, demo.Tick(m))
		// Fail fast on a master that is gone: no dial retries.
		rdbs = append(rdbs, redis.NewClient(&redis.Options{Addr: m.Addr(), MaxRetries: -1,
			DialerRetries: 1, DialTimeout: 100 * time.Millisecond}))
	}
	fmt.Println("using 5 embedded miniredis masters (set REDIS_ADDRS to use real ones)")
	return rdbs, minis, func() {
		for i, r := range rdbs {
			_ = r.Close()
			stops[i]()
			minis[i].Close()
		}
	}
}

// firstLine is the first line of err's message.
func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}

// quiet is a go-redis logger that discards everything.
type quiet struct{}

func (quiet) Printf(context.Context, string, ...any) {}
