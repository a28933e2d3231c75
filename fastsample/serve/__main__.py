from fastsample.serve.command import main

raise SystemExit(main())
