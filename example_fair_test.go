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
	for _, who := range []string{"ann", "bob", "cy"} {
		m := client.FairMutex("printer")
		go func() {
			_ = m.Lock(ctx)
			order <- who
			_ = m.Unlock(ctx)
		}()
		time.Sleep(50 * time.Millisecond) // let it queue before the next one
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
