// Command latch starts 3 workers that wait on a CountDownLatch until 4
// start-up tasks, run on another Client (another service instance), have
// counted it down to zero. The last CountDown wakes every waiter at once by
// pub/sub, and deletes the latch.
//
//	go run ./examples/latch              # embedded miniredis
//	REDIS_ADDR=localhost:6379 go run ./examples/latch
package main

import (
	"context"
	"fmt"
	"log"
	"sync"
	"time"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/demo"
)

const name = "latch-demo:warm-up"

func main() {
	rdb, done := demo.Redis()
	defer done()
	ctx := context.Background()

	waiters, tasks := redlatch.New(rdb), redlatch.New(rdb)
	defer waiters.Close()
	defer tasks.Close()

	latch := tasks.CountDownLatch(name)
	ok, err := latch.TrySetCount(ctx, 4)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("count set to 4: %v\n", ok)
	ok, _ = latch.TrySetCount(ctx, 10)
	fmt.Printf("a second TrySetCount while counting: %v\n", ok)

	var wg sync.WaitGroup
	woke := make([]time.Time, 3)
	for i := range woke {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A count never expires: bound the wait, or a task instance that
			// crashes before its CountDown leaves this waiter blocked for good.
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if err := waiters.CountDownLatch(name).Wait(wctx); err != nil {
				log.Fatal(err)
			}
			woke[i] = time.Now()
		}()
	}

	var zero time.Time
	for task := 1; task <= 4; task++ {
		time.Sleep(100 * time.Millisecond) // a start-up task
		if task == 4 {
			zero = time.Now()
		}
		if err := latch.CountDown(ctx); err != nil {
			log.Fatal(err)
		}
		n, _ := latch.Count(ctx)
		fmt.Printf("task %d done; count %d\n", task, n)
	}
	wg.Wait()
	for i, at := range woke {
		fmt.Printf("waiter %d woke %v after the count reached zero\n", i, at.Sub(zero).Round(time.Millisecond))
	}
	n, _ := rdb.Exists(ctx, "{"+name+"}:latch").Result()
	ttl, _ := rdb.PTTL(ctx, "{"+name+"}:latch:done").Result()
	fmt.Printf("count key left: %d; request ids kept for retries, expiring in %v\n", n, ttl.Round(time.Second))
}
