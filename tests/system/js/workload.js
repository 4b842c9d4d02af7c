// CRUD, an aggregate, a cursor with several getMores and an error, printed as canonical JSON lines.
const { MongoClient } = require("mongodb");

async function main() {
  const [uri, dbName] = process.argv.slice(2);
  const client = new MongoClient(uri, { appName: "node-itest", directConnection: true });
  await client.connect();
  const coll = client.db(dbName).collection("things");
  const out = [];
  out.push(["insertMany", (await coll.insertMany(Array.from({ length: 9 }, (_, i) => ({ _id: i, k: i % 3 })))).insertedCount]);
  out.push(["findOne", await coll.findOne({ _id: 4 })]);
  out.push(["cursor", await coll.find({}, { batchSize: 2 }).sort({ _id: 1 }).toArray()]);
  out.push(["updateMany", (await coll.updateMany({ k: 1 }, { $set: { seen: true } })).modifiedCount]);
  out.push(["aggregate", await coll.aggregate([{ $group: { _id: "$k", n: { $sum: 1 } } }, { $sort: { _id: 1 } }]).toArray()]);
  out.push(["deleteOne", (await coll.deleteOne({ _id: 8 })).deletedCount]);
  try {
    await coll.insertOne({ _id: 1 });
    out.push(["duplicate", null]);
  } catch (e) {
    out.push(["duplicate", e.code]);
  }
  for (const line of out) console.log(JSON.stringify(line));
  await client.close();
}

main().catch((e) => { console.error(e); process.exit(1); });
