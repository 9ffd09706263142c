from kfqn.cli import main

raise SystemExit(main())
