// Command watchdog runs a long job under a lock whose lease (1.5s) is much
// shorter than the job: the Client's watchdog renews it every 0.5s while the
// job runs. Then an operator force-unlocks the lock; the watchdog notices at
// its next renewal, and the job's context is cancelled with cause
// redlatch.ErrLost, so the job stops instead of running on unprotected.
//
//	go run ./examples/watchdog              # embedded miniredis
//	REDIS_ADDR=localhost:6379 go run ./examples/watchdog
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

func main() {
	rdb, done := demo.Redis()
	defer done()
	ctx := context.Background()

	client := redlatch.New(rdb, redlatch.WithWatchdogTimeout(1500*time.Millisecond))
	defer client.Close()
	lock := client.Mutex("watchdog-demo:reindex")

	// The operator, elsewhere, force-unlocks the lock after 4.25 seconds
	// (between two steps, so that no step reports the lease of a lock
	// already gone).
	operator := client.Mutex("watchdog-demo:reindex")
	time.AfterFunc(4250*time.Millisecond, func() {
		ok, err := operator.ForceUnlock(ctx)
		fmt.Printf("operator: ForceUnlock -> %v, %v\n", ok, err)
	})

	start := time.Now()
	err := redlatch.Do(ctx, lock, func(ctx context.Context) error {
		fmt.Printf("job: started with fencing token %d\n", lock.Token())
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for step := 1; step <= 10; step++ {
			select {
			case <-ctx.Done():
				fmt.Printf("job: stopped at step %d: %v\n", step, context.Cause(ctx))
				return ctx.Err()
			case <-tick.C:
				ttl, _ := lock.TTL(ctx)
				fmt.Printf("job: step %d done, lease left %v (renewed by the watchdog)\n", step, ttl.Round(100*time.Millisecond))
			}
		}
		return nil
	})
	switch {
	case errors.Is(err, redlatch.ErrLost):
		fmt.Printf("main: the job lost its lock after %v and was cancelled\n", time.Since(start).Round(100*time.Millisecond))
	case err != nil:
		log.Fatal(err)
	default:
		fmt.Println("main: the job finished under the lock")
	}
}
