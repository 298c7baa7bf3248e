package redlatch_test

import (
	"context"
	"fmt"
	"time"

	"github.com/redlatch/redlatch"
)

func ExampleFairMutex() {
	rdb, done := exampleRedis()
	defer done()
	ctx := context.Background()
	client := redlatch.New(rdb)
	defer client.Close()

	first := client.FairMutex("printer")
	_ = first.Lock(ctx)

	// Three workers queue, one after another; each gets the lock in turn.
	order := make(chan string, 3)
	for i, who := range []string{"ann", "bob", "cy"} {
		m := client.FairMutex("printer")
		go func() {
			_ = m.Lock(ctx)
			order <- who
			_ = m.Unlock(ctx)
		}()
		// Let it queue before the next one: wait until its arrival is in
		// the queue ({name}:fairq), not for a guessed time.
		for rdb.ZCard(ctx, "{printer}:fairq").Val() < int64(i+1) {
			time.Sleep(time.Millisecond)
		}
	}
	_ = first.Unlock(ctx)
	for range 3 {
		fmt.Println(<-order)
	}
	// Output:
	// ann
	// bob
	// cy
}
