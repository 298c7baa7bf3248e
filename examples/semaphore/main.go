// Command semaphore limits 8 workers, spread over two Clients (two service
// instances), to 3 concurrent calls of a rate-limited API with a Semaphore of
// size 3. Then a holder "crashes" (its Client is closed without Release): its
// permits come back when their lease (1.5s here) runs out, and a waiter gets
// them.
//
//	go run ./examples/semaphore              # embedded miniredis
//	REDIS_ADDR=localhost:6379 go run ./examples/semaphore
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

const name = "semaphore-demo:partner-api"

func main() {
	rdb, done := demo.Redis()
	defer done()
	ctx := context.Background()

	a, b := redlatch.New(rdb), redlatch.New(rdb)
	defer a.Close()
	defer b.Close()

	// 8 workers, 3 permits: never more than 3 calls at once.
	var inside, most atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		c := a
		if w%2 == 1 {
			c = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem := c.Semaphore(name, 3)
			if err := sem.Acquire(ctx, 1); err != nil {
				log.Fatal(err)
			}
			now := inside.Add(1)
			for m := most.Load(); now > m && !most.CompareAndSwap(m, now); m = most.Load() {
			}
			select {
			case <-time.After(50 * time.Millisecond): // the API call
			case <-sem.Lost(): // the permit expired or vanished: stop using it
				log.Print("permit lost")
			}
			inside.Add(-1)
			// After a loss Release reports ErrNotHeld: nothing to return.
			if err := sem.Release(ctx, 1); err != nil && !errors.Is(err, redlatch.ErrNotHeld) {
				log.Fatal(err)
			}
		}()
	}
	wg.Wait()
	fmt.Printf("8 workers done; at most %d held permits at once\n", most.Load())

	// A holder that crashes: its permits are leased, so they come back.
	crashing := redlatch.New(rdb, redlatch.WithWatchdogTimeout(1500*time.Millisecond))
	held := crashing.Semaphore(name, 3)
	if err := held.Acquire(ctx, 3); err != nil {
		log.Fatal(err)
	}
	free, _ := a.Semaphore(name, 3).Available(ctx)
	fmt.Printf("a holder took all 3 permits; available: %d\n", free)
	_ = crashing.Close() // no Release: the watchdog stops renewing
	crashed := time.Now()

	sem := a.Semaphore(name, 3)
	if err := sem.Acquire(ctx, 2); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("the crashed holder's permits came back after %v (lease 1.5s)\n",
		time.Since(crashed).Round(100*time.Millisecond))
	free, _ = sem.Available(ctx)
	fmt.Printf("took 2; available: %d\n", free)
	if err := sem.Release(ctx, 2); err != nil {
		log.Fatal(err)
	}
	fmt.Println("done")
}
